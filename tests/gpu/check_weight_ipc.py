"""CUDA IPC round trip of a weight bucket between two processes, as the colocated tensor transport
(megatron_rlrt/rollout/weight_transport.py) and an SGLang server do it. Needs one GPU and torch
only (no SGLang, no aiohttp).

The parent (the trainer's side) flattens a bf16/fp32 bucket on the GPU and serializes it with
``sglang_protocol.serialize_flattened_bucket`` (torch's multiprocessing reductions, the device
named by UUID as SGLang's ``monkey_patch_torch_reductions`` does). A separate process (the
server's side) opens it with a UUID -> device-index rebuild (the CPU suite checks the same
payloads against SGLang's SafeUnpickler allow-list), checks every tensor against the parent's values, checks it maps the SAME memory (it
writes a marker the parent then reads), and answers. Writes ``$OUT/weight_ipc.json``.

Second check (``per_rank``): the colocated transport's per-GPU handles for real
(``TensorTransport.exchange`` with ``NodePeers``): two training processes (on GPUs 0 and 1, or
both on GPU 0 on a one-GPU machine) each flatten the same bucket on their own GPU; the leader
gathers the handles and gives them, as one ``serialized_named_tensors`` list, to a third
process (the server) that opens entry i as SGLang's TP rank i does; entry i must live on the
GPU of training rank i (device index), hold the bucket's values, and the buffers must stay
valid until the server answered. ``--cpu`` runs the same plumbing with shared memory (dry run).

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

UNPICKLER = r"""
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

"""  # both child scripts start with it: SGLang's unpickler (CUDA devices travel as UUIDs)

CHILD = UNPICKLER + r"""
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


SERVER = UNPICKLER + r"""
out = []
for entry in json.loads(sys.stdin.read()):  # entry i: what TP rank i deserializes
    data = ByUUID(io.BytesIO(base64.b64decode(entry))).load()
    flat = data["flattened_tensor"]
    sums = {m.name: float(flat[m.start_idx:m.end_idx].view(m.dtype).float().sum().item()) for m in data["metadata"]}
    out.append({"device": str(flat.device), "index": flat.device.index, "sums": sums})
print(json.dumps(out))
"""


def _bucket(device):
    g = torch.Generator(device=device).manual_seed(0)
    return [("model.embed_tokens.weight", torch.randn(1024, 256, device=device, generator=g).bfloat16()),
            ("model.norm.weight", torch.rand(257, device=device, generator=g))]


def _per_rank_worker(rank: int, port: int, use_cpu: bool, result_path: str) -> None:
    import torch.distributed as dist

    from megatron_rlrt.rollout.weight_transport import NodePeers, TensorTransport

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    device = torch.device("cpu") if use_cpu else torch.device("cuda", rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    transport = TensorTransport(device)
    transport.peers = NodePeers(dist.group.WORLD, [0, 1])
    seen: dict = {}

    def post(handles):  # the leader: one request with a handle per TP rank, to the 'server' process
        proc = subprocess.run([sys.executable, "-c", SERVER], input=json.dumps(handles), capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        seen["entries"] = json.loads(proc.stdout.strip().splitlines()[-1])

    bucket = _bucket(device)
    transport.exchange([bucket], post if rank == 0 else None)
    if rank == 0:
        expected = {n: float(t.float().sum().item()) for n, t in bucket}
        want = [None if use_cpu else r % torch.cuda.device_count() for r in range(2)]
        entries = seen["entries"]
        ok = len(entries) == 2 and all(
            e["index"] == w and all(abs(e["sums"][n] - v) < 1e-3 for n, v in expected.items())
            for e, w in zip(entries, want))
        with open(result_path, "w") as f:
            json.dump({"ok": ok, "entries": entries, "expected_devices": want, "expected_sums": expected}, f)
    dist.barrier()
    dist.destroy_process_group()


def check_per_rank(use_cpu: bool) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    from megatron_rlrt.parallel import free_port

    path = os.path.join(tempfile.mkdtemp(), "per_rank.json")
    mp.start_processes(_per_rank_worker, args=(free_port(), use_cpu, path), nprocs=2, join=True, start_method="spawn")
    with open(path) as f:
        return json.load(f)


def main() -> int:
    from megatron_rlrt.rollout import sglang_protocol as sp

    if "--cpu" in sys.argv:  # dry run of the per-rank plumbing on a machine without CUDA
        result = check_per_rank(use_cpu=True)
        print(json.dumps(result, indent=1))
        return 0 if result["ok"] else 1

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
    if torch.cuda.is_available():
        try:
            result["per_rank"] = check_per_rank(use_cpu=False)
        except Exception as exc:  # noqa: BLE001 - recorded
            result["per_rank"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        result["ok"] = bool(result["ok"] and result["per_rank"]["ok"])
    with open(os.path.join(out_dir, "weight_ipc.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
