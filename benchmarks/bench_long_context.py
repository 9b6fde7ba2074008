#!/usr/bin/env python
"""Peak memory and step time of a full RLRT step with long responses, on CPU (issue 15).

One trainer step (no-grad student+teacher log-prob pass, token advantages, PPO update through
megatron's schedule, DDP and Adam) on a fixed-token batch from the test harness
(tests/helpers/dist_helpers_long.py: one group of two responses of N tokens, the correct one with its
teacher row = prompt + peer solution + the same response; no sampling). Tiny Qwen3 with the REAL
151,936-entry vocabulary, hidden 96, 2 layers (the issue's baseline model), float32.

Per response length and layout it prints the peak RSS of every rank during the step (VmHWM
reset right before it, megatron_rlrt/procmem.py; whole process: model,
Adam, rank 0's HF rollout engine), the peak above the RSS just before the step ("extra peak"; an
underestimate when the step reuses memory the process already freed), the step time, and:
  * growth: peak RSS per response token between consecutive lengths -- constant when memory
    grows linearly (a quadratic term would double it with each doubling of N);
  * ratio vs the issue's baseline (measured 2026-12-02 before this work, `collect` only, one
    sample, 1 rank: 1,024 -> +2.4 GB, 2,048 -> +4.8 GB, 4,096 -> +9.6 GB, 8,192 -> +19.4 GB).
The baseline cannot be re-measured in the same run: the old path (explicit [T, T] mask and
[tokens, vocab] logits) no longer exists and needs more than this machine's 24 GB at 20k.

    python benchmarks/bench_long_context.py                                 # 5k/10k/20k, CP=1 and CP=2
    python benchmarks/bench_long_context.py --lengths 20480 --layouts tp2cp2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYOUTS = {"cp1": ([], 1), "cp2": (["--context-parallel-size", "2"], 2),
           "tp2cp2": (["--tensor-model-parallel-size", "2", "--context-parallel-size", "2"], 4)}
ISSUE_BASELINE_GB = {1024: 2.4, 2048: 4.8, 4096: 9.6, 8192: 19.4}  # extra peak, collect only, before issue 15


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--lengths", type=int, nargs="+", default=[5120, 10240, 20480], help="response tokens")
    p.add_argument("--layouts", nargs="+", default=["cp1", "cp2"], choices=sorted(LAYOUTS), help="parallel layouts")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    p.add_argument("--peer-len", type=int, default=256, help="peer-solution tokens in the teacher prompt")
    p.add_argument("--max-tokens-per-gpu", type=int, default=8192, help="training micro-batch budget per GPU")
    p.add_argument("--log-probs-max-tokens-per-gpu", type=int, default=16384, help="no-grad pass budget per GPU")
    p.add_argument("--recompute", action="store_true", help="--recompute-granularity full (uniform, 1 layer)")
    p.add_argument("--json", help="write the results here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from megatron_rlrt import parallel
    from megatron_rlrt.data.generators import reasoning_gym_rows, write_jsonl
    from tests.helpers.dist_helpers_long import long_step_rank
    from tools.make_tiny_qwen3 import make_tiny_qwen3

    tmp = tempfile.mkdtemp(prefix="bench_long_")
    longest = max(args.lengths) + args.prompt_len + args.peer_len
    model = make_tiny_qwen3(os.path.join(tmp, "model"), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                            max_position_embeddings=max(32768, longest), seed=0)
    data = os.path.join(tmp, "train.jsonl")
    write_jsonl(list(reasoning_gym_rows("chain_sum", size=4, seed=0)), data)
    results = []
    for layout in args.layouts:
        flags, world = LAYOUTS[layout]
        for n in args.lengths:
            argv_ = ["--hf-checkpoint", model, "--prompt-data", data, "--reward", "hash_parity",
                     "--advantage-estimator", "rlrt", "--rollout-batch-size", "1", "--n-samples-per-prompt", "2",
                     "--rollout-max-response-len", str(n), "--train-iters", "1", "--lr", "1e-4",
                     "--lr-warmup-iters", "0", "--no-progress", "--no-tensorboard", "--use-dynamic-batch-size",
                     "--max-tokens-per-gpu", str(args.max_tokens_per_gpu),
                     "--log-probs-max-tokens-per-gpu", str(args.log_probs_max_tokens_per_gpu), "--seed", "5"] + flags
            if args.recompute:
                argv_ += ["--recompute-granularity", "full"]
            out = os.path.join(tmp, f"{layout}-{n}.pt")
            parallel.spawn(long_step_rank, world, argv_, (args.prompt_len, args.peer_len, n), out)
            rec = torch.load(out, weights_only=False)
            ranks = rec["ranks"]
            row = {"layout": layout, "response_tokens": n, "world": world,
                   "extra_peak_gb_per_rank": [round(r["peak_rss_gb"] - r["rss_before_step_gb"], 3) for r in ranks],
                   "peak_rss_gb_per_rank": [round(r["peak_rss_gb"], 3) for r in ranks],
                   "step_s": round(max(r["step_s"] for r in ranks), 1),
                   "grad_norm": rec["metrics"].get("actor/grad_norm")}
            results.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"{'layout':8} {'N':>6} {'extra peak GB (max rank)':>25} {'peak RSS GB':>12} {'step s':>8} "
          f"{'peak MB/token':>16} {'peak vs issue 8k +19.4 GB':>23}")
    for layout in args.layouts:
        rows = [r for r in results if r["layout"] == layout]
        prev = None
        for r in rows:
            extra, peak = max(r["extra_peak_gb_per_rank"]), max(r["peak_rss_gb_per_rank"])
            growth = "" if prev is None else f"{(peak - prev[1]) * 1e3 / (r['response_tokens'] - prev[0]):.3f}"
            print(f"{layout:8} {r['response_tokens']:>6} {extra:>25.2f} {peak:>12.2f} "
                  f"{r['step_s']:>8.1f} {growth:>16} {peak / ISSUE_BASELINE_GB[8192]:>22.3f}x")
            prev = (r["response_tokens"], peak)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
