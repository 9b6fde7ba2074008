"""CUDA IPC round trip of a weight bucket between two processes, as the colocated tensor transport
(megatron_rlrt/rollout/weight_transport.py) and an SGLang server do it. Needs one GPU and torch
only (no SGLang, no aiohttp).

The parent (the trainer's side) flattens a bf16/fp32 bucket on the GPU and serializes it with
``sglang_protocol.serialize_flattened_bucket`` (torch's multiprocessing reductions, the device
named by UUID as SGLang's ``monkey_patch_torch_reductions`` does). A separate process (the
server's side) opens it with a UUID -> device-index rebuild (the CPU suite checks the same
payloads against SGLang's SafeUnpickler allow-list), checks every tensor against the parent's values, checks it maps the SAME memory (it
writes a marker the parent then reads), and answers. Writes ``$OUT/weight_ipc.json``.

The CPU suite runs the same serializer with shared memory instead of IPC handles
(tests/test_sglang_engine.py, tests/test_rollout_placements.py); this script is the part only a
GPU can show.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

CHILD = r"""
import base64, io, json, pickle, sys
import torch
from torch.multiprocessing import reductions

real = reductions.rebuild_cuda_tensor

def by_uuid(*args):  # SGLang's patch: the device travels as a UUID string
    args = list(args)
    if isinstance(args[6], str):
        args[6] = next(i for i in range(torch.cuda.device_count())
                       if str(torch.cuda.get_device_properties(i).uuid) == args[6])
    return real(*args)

class ByUUID(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch.multiprocessing.reductions" and name == "rebuild_cuda_tensor":
            return by_uuid
        return super().find_class(module, name)

data = ByUUID(io.BytesIO(base64.b64decode(sys.stdin.read()))).load()
flat = data["flattened_tensor"]
out = {"device": str(flat.device), "is_cuda": flat.is_cuda, "tensors": {}}
for m in data["metadata"]:
    t = flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)
    out["tensors"][m.name] = [str(t.dtype), list(t.shape), float(t.float().sum().item())]
flat[0] = 123  # the parent must see this: same memory, not a copy
torch.cuda.synchronize()
print(json.dumps(out))
"""


def main() -> int:
    from megatron_rlrt.rollout import sglang_protocol as sp

    out_dir = os.environ.get("OUT", os.path.join(REPO, "tests", "gpu", "results"))
    os.makedirs(out_dir, exist_ok=True)
    result: dict = {"ok": False}
    if not torch.cuda.is_available():
        result["error"] = "no CUDA device"
    else:
        g = torch.Generator(device="cuda").manual_seed(0)
        bucket = [("model.embed_tokens.weight", torch.randn(1024, 256, device="cuda", generator=g).bfloat16()),
                  ("model.norm.weight", torch.rand(257, device="cuda", generator=g)),
                  ("lm_head.weight", torch.randn(512, 256, device="cuda", generator=g).bfloat16())]
        flat, meta = sp.flatten_bucket(bucket, align=16)
        t0 = time.perf_counter()
        payload = sp.serialize_flattened_bucket(flat, meta)
        torch.cuda.synchronize()
        proc = subprocess.run([sys.executable, "-c", CHILD], input=payload, capture_output=True, text=True,
                              timeout=300)
        result["round_trip_s"] = time.perf_counter() - t0
        if proc.returncode != 0:
            result["error"] = proc.stderr[-3000:]
        else:
            seen = json.loads(proc.stdout.strip().splitlines()[-1])
            expected = {n: [str(t.dtype), list(t.shape), float(t.float().sum().item())] for n, t in bucket}
            same_values = all(seen["tensors"][n][:2] == e[:2] and abs(seen["tensors"][n][2] - e[2]) < 1e-3
                              for n, e in expected.items())
            torch.cuda.synchronize()
            shared = int(flat[0].item()) == 123
            result.update(ok=bool(seen["is_cuda"] and same_values and shared), child=seen, same_values=same_values,
                          same_memory=shared, payload_bytes=len(base64.b64decode(payload)),
                          bucket_bytes=int(flat.numel()))
    with open(os.path.join(out_dir, "weight_ipc.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
