"""GPU check of long packed forwards (issue 15): Transformer Engine attention on a THD batch.

    python tests/gpu/check_long_context.py [--out DIR] [--tokens 32768]

On one GPU with Transformer Engine: a tiny real-architecture Qwen3 (GQA, real vocabulary, bf16)
built with the TE layer spec runs ONE packed forward of --tokens tokens (a student row, its
teacher row and a short row; THD, ``cu_seqlens``, no mask), then the same weights with the local
spec (megatron_rlrt's PackedCoreAttention, torch SDPA per row) on the same GPU:
  * per-token log-probs of the two agree (max |diff| <= 2e-2 in bf16) and are finite;
  * peak CUDA memory of the TE forward stays linear: below 4x the 8k-token run's (a [T, T]
    score matrix would be 16x);
  * time of both forwards.
Without a GPU or Transformer Engine it records "not run" and exits 0. Writes
check_long_context.json to --out (default $OUT or tests/gpu/results/; with --stdout-only, as in
run_all.sh, only to stdout). Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


def packed_logprobs(chunks, tokens, cu, max_len, labels):
    from megatron.core.packed_seq_params import PackedSeqParams

    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                             max_seqlen_kv=max_len)
    with torch.no_grad():
        logits = chunks[0](input_ids=tokens, position_ids=None, attention_mask=None, packed_seq_params=params)[0]
        return torch.cat([torch.log_softmax(logits[i : i + 4096].float(), -1).gather(1, labels[i : i + 4096, None])[:, 0]
                          for i in range(0, logits.shape[0], 4096)])


def run(tokens_total: int, out_dir: str) -> dict:
    from megatron_rlrt import parallel
    from megatron_rlrt.models.hf_checkpoint import load_hf_weights
    from megatron_rlrt.models.megatron_checkpoint import load_hf_into_model
    from megatron_rlrt.models.qwen3 import Qwen3Spec, build_model, transformer_config
    from megatron_rlrt.platform import detect
    from tools.make_tiny_qwen3 import make_tiny_qwen3

    p = detect()
    if not p.is_cuda or not p.has_transformer_engine:
        return {"status": "not run", "reason": f"cuda={p.is_cuda}, transformer_engine={p.has_transformer_engine}"}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(parallel.free_port()))
    parallel.initialize(parallel.ParallelLayout())
    tmp = tempfile.mkdtemp()
    hf = make_tiny_qwen3(os.path.join(tmp, "m"), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=65536,
                         tie_word_embeddings=False, dtype="bfloat16", seed=0)
    spec = Qwen3Spec.from_hf_dir(hf)
    weights = load_hf_weights(hf, spec)
    g = torch.Generator().manual_seed(0)
    result = {"status": "run", "device": torch.cuda.get_device_name()}
    for n in (8192, tokens_total):
        rows = [n // 2 - 64, n // 2 - 64, 128]  # student row, teacher row, a short row
        cu = torch.tensor([0] + rows, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
        tokens = torch.randint(0, spec.vocab_size, (1, n), generator=g).cuda()
        labels = torch.roll(tokens[0], -1)
        per = {}
        for use_te in (True, False):
            config = transformer_config(spec, params_dtype=torch.bfloat16, perform_initialization=False, use_te=use_te)
            chunks = build_model(spec, config, use_te=use_te)
            load_hf_into_model(chunks, spec, weights)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            lp = packed_logprobs(chunks, tokens, cu, max(rows), labels)
            torch.cuda.synchronize()
            per["te" if use_te else "local"] = {"lp": lp, "seconds": time.perf_counter() - t0,
                                               "peak_gb": (torch.cuda.max_memory_allocated() - base) / 1e9}
            del chunks
        diff = (per["te"]["lp"] - per["local"]["lp"]).abs().max().item()
        result[str(n)] = {"te_s": round(per["te"]["seconds"], 3), "local_s": round(per["local"]["seconds"], 3),
                          "te_peak_gb": round(per["te"]["peak_gb"], 3), "local_peak_gb": round(per["local"]["peak_gb"], 3),
                          "max_abs_logprob_diff": diff, "finite": bool(torch.isfinite(per["te"]["lp"]).all())}
        assert result[str(n)]["finite"] and diff <= 2e-2, result[str(n)]
    small, big = result["8192"], result[str(tokens_total)]
    # logits [T, V] dominate both; attention must add nothing quadratic
    assert big["te_peak_gb"] <= small["te_peak_gb"] * (tokens_total / 8192) * 1.25, (small, big)
    parallel.destroy()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "tests", "gpu", "results")))
    ap.add_argument("--tokens", type=int, default=32768, help="packed tokens of the long forward")
    ap.add_argument("--stdout-only", action="store_true", help="print the JSON only (run_all.sh: the device "
                    "tool returns at most 8 files, and gpu_run.log holds this output)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    try:
        res, rc = run(args.tokens, args.out), 0
    except Exception as exc:
        res, rc = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-3000:]}, 1
    print(json.dumps(res, indent=1, default=str))
    if args.stdout_only:
        return rc
    with open(os.path.join(args.out, "check_long_context.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
