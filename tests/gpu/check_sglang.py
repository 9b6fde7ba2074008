#!/usr/bin/env python
"""GPU check for the server rollout engines (issue 6, item 4). One short run, results to a file.

    python tests/gpu/check_sglang.py [--output tests/gpu/results/check_sglang.json]

- If SGLang imports here: start ONE SGLang server on a 0.6B-shaped Qwen3 (random weights, real
  architecture: hidden 1024, 28 layers, 16/8 heads, head_dim 128, tied embeddings, bf16) through
  ``SGLangEngine`` (colocated, CUDA-IPC weight sync), generate with log-probs, push new weights
  (timed), check the served version and that greedy outputs changed; then the same through the
  disk path (timed).
- Otherwise (the usual GPU image has no SGLang; this is recorded as ``sglang_importable:
  false``): run the in-process HF path on CUDA (generate with the same model) and time the
  trainer side of each weight-sync path for the 0.6B shape: HF-named tensors -> 512 MiB
  buckets -> flattened CUDA buffers + IPC-handle payloads (what ``update_weights_from_tensor``
  sends), -> safetensors snapshot (disk path), and loading them into the HF model.

Writes one JSON file; nothing else. Status: written, NOT yet run (no GPU in the session that
wrote it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SHAPE_0P6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)


def timed(fn, *args, **kwargs):
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def perturbed_state(model, scale=1e-3):
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    return [(n, (p.detach() + scale * torch.randn(p.shape, generator=g, device="cuda", dtype=p.dtype)))
            for n, p in model.state_dict().items() if n != "lm_head.weight"]


def run_sglang(model_dir: str, report: dict) -> None:
    from megatron_rlrt.rollout.base import SamplingParams, iter_weight_buckets
    from megatron_rlrt.rollout.sglang_engine import SGLangEngine
    from transformers import AutoModelForCausalLM
    import torch

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    prompts = [[151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198]] * 4
    greedy = SamplingParams(max_new_tokens=32, temperature=0.0)
    eng, t_start = timed(SGLangEngine, model_path=model_dir, colocate=True, rollout_num_gpus=1,
                         mem_fraction_static=0.5, progress=False, weight_sync="tensor", log_dir="/tmp/sglang_logs")
    try:
        report["sglang_start_s"] = t_start
        before, t_gen = timed(eng.generate, prompts, 4, SamplingParams(max_new_tokens=128))
        report["generate_s"], report["tokens_per_s"] = t_gen, eng.metrics["perf/rollout_tokens_per_s"]
        g0 = eng.generate(prompts[:1], 1, greedy)[0][0].response_ids
        named = perturbed_state(hf, scale=0.05)
        _, t_ipc = timed(eng.update_weights, iter_weight_buckets(named, 512 * 1024**2), 1)
        report["weight_sync_tensor_ipc_s"] = t_ipc
        report["served_versions_after_ipc"] = eng.served_weight_versions()
        g1 = eng.generate(prompts[:1], 1, greedy)[0][0].response_ids
        report["greedy_changed_after_ipc"] = g0 != g1
        eng.weight_sync = "disk"
        _, t_disk = timed(eng.update_weights, iter_weight_buckets(named, 512 * 1024**2), 2)
        report["weight_sync_disk_s"] = t_disk
        eng.release_memory()
        eng.resume_memory()
        report["release_resume_ok"] = True
        report["health"] = eng.health()
    finally:
        eng.shutdown()


def run_hf_path(model_dir: str, report: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_rlrt.rollout import sglang_protocol as sp
    from megatron_rlrt.rollout.base import iter_weight_buckets

    hf, t_load = timed(lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda())
    report["hf_load_s"] = t_load
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198]] * 8, device="cuda")
    out, t_gen = timed(hf.generate, ids, max_new_tokens=128, do_sample=True, min_new_tokens=128)
    report["hf_generate_tokens_per_s"] = (out.shape[1] - ids.shape[1]) * ids.shape[0] / t_gen
    named = perturbed_state(hf)
    report["weights_bytes"] = sum(t.numel() * t.element_size() for _, t in named)

    def ipc_payloads():
        payloads = []
        for bucket in iter_weight_buckets(named, 512 * 1024**2):
            flat, meta = sp.flatten_bucket(bucket, align=16)
            payloads.append(sp.serialize_flattened_bucket(flat, meta))
        return payloads

    payloads, t_ipc = timed(ipc_payloads)
    report["trainer_side_tensor_ipc_s"] = t_ipc
    report["ipc_payload_chars"] = sum(len(p) for p in payloads)

    def broadcast_buffers():
        return [sp.flatten_bucket(part)[0] for b in iter_weight_buckets(named, 512 * 1024**2)
                for part in sp.split_by_dtype(b)]

    _, t_flat = timed(broadcast_buffers)
    report["trainer_side_flatten_for_broadcast_s"] = t_flat

    def snapshot():
        from safetensors.torch import save_file

        d = tempfile.mkdtemp()
        for i, b in enumerate(iter_weight_buckets(named, 512 * 1024**2)):
            save_file({n: t.cpu().contiguous() for n, t in b}, os.path.join(d, f"model-{i:05d}.safetensors"))
        return d

    _, t_disk = timed(snapshot)
    report["trainer_side_disk_snapshot_s"] = t_disk

    def load_in_process():
        with torch.no_grad():
            hf.load_state_dict(dict(named), strict=False)

    _, t_hf = timed(load_in_process)
    report["hf_in_process_load_s"] = t_hf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "check_sglang.json"))
    args = p.parse_args(argv)
    import torch

    report: dict = {"python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available()}
    try:
        import sglang  # noqa: F401

        report["sglang_importable"], report["sglang_version"] = True, getattr(sglang, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        report["sglang_importable"], report["sglang_import_error"] = False, f"{type(exc).__name__}: {exc}"[:300]
    if not torch.cuda.is_available():
        report["skipped"] = "no CUDA device"
    else:
        report["gpu"] = torch.cuda.get_device_name(0)
        from tools.make_tiny_qwen3 import make_tiny_qwen3

        model_dir = make_tiny_qwen3(os.path.join(tempfile.mkdtemp(), "qwen3_0p6b_shape"), dtype="bfloat16",
                                    **SHAPE_0P6B)
        try:
            (run_sglang if report["sglang_importable"] else run_hf_path)(model_dir, report)
            report["ok"] = True
        except Exception:  # noqa: BLE001 - the report records the failure
            import traceback

            report["ok"], report["error"] = False, traceback.format_exc()[-3000:]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(json.dumps(report, indent=1, default=str))
    return 0 if report.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
