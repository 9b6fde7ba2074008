#!/usr/bin/env python
"""D_t noise of the packed no-grad pass: how far from 0 is D_t = log P_S - log P_T when the
teacher sees nothing extra (teacher rows = student rows), per precision, next to the D_t of a
real privileged context measured in the same run.

The trainer's own ``collect`` (one packed forward over student and teacher rows) on one CPU
rank with a tiny random Qwen3 (real 151,936-entry vocabulary). Prints, per dtype: mean / p99 /
max |D_t| of the null teacher, the fraction of tokens with D_t exactly 0, the largest change the
noise makes to RLRT's A_t (eq. 6-7, lambda 0.5, eps_w 0.5), and noise / signal = mean |D_t|
(null) / mean |D_t| (16 random context tokens). FP8 is measured on a GPU by tests/gpu/check_fp8.py.

    python benchmarks/bench_dt_noise.py                 # ~1 minute on 2 CPU cores
    python benchmarks/bench_dt_noise.py --without-rope  # diagnostic: RoPE patched out (attributes any noise)

Since packed rows go as THD with per-row RoPE and attention, the expected result is D_t = 0
exactly in fp32 and bf16 (benchmarks/RESULTS.md has the numbers from before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="parameter dtypes to measure")
    p.add_argument("--samples", type=int, default=16, help="RL samples (each: a student row and its teacher row)")
    p.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 8],
                   help="samples per packed forward (1: a sample's two rows alone in a pack)")
    p.add_argument("--hidden-size", type=int, default=128, help="tiny model width")
    p.add_argument("--layers", type=int, default=4, help="tiny model depth")
    p.add_argument("--without-rope", action="store_true",
                   help="diagnostic: replace megatron's apply_rotary_pos_emb by the identity")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    return p


def _rank(hf_dir, dtype, out, samples, mbs, without_rope):
    from megatron_rlrt.platform import setup_megatron

    setup_megatron()
    if without_rope:
        import megatron.core.transformer.attention as attention

        attention.apply_rotary_pos_emb = lambda t, *args, **kwargs: t
    from tests.helpers.precision_helpers import null_teacher_rank

    null_teacher_rank(hf_dir, dtype, out, samples, tuple(mbs), ("same", "context"))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_rlrt import parallel
    from tools.make_tiny_qwen3 import make_tiny_qwen3

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_qwen3(os.path.join(tmp, "tiny"), hidden_size=args.hidden_size,
                                 intermediate_size=2 * args.hidden_size, num_hidden_layers=args.layers,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden_size // 4)
        for dtype in args.dtypes:
            out = os.path.join(tmp, f"{dtype}.json")
            parallel.spawn(_rank, 1, hf_dir, dtype, out, args.samples, args.micro_batch_sizes, args.without_rope)
            with open(out) as f:
                results[dtype] = json.load(f)
    print(f"\nnull teacher (teacher rows = student rows), {args.samples} samples, hidden {args.hidden_size}, "
          f"{args.layers} layers{', RoPE patched out' if args.without_rope else ''}")
    print(f"{'dtype':9} {'mb':>3} {'tokens':>6} {'mean|Dt|':>10} {'p99|Dt|':>10} {'max|Dt|':>10} {'Dt==0':>6} "
          f"{'max|At-A|':>10} {'ctx mean|Dt|':>12} {'noise/signal':>12}")
    for dtype, r in results.items():
        for mbs in args.micro_batch_sizes:
            same, ctx = r[f"same/{mbs}"], r[f"context/{mbs}"]
            print(f"{dtype:9} {mbs:>3} {same['tokens']:>6} {same['mean_abs']:>10.2e} {same['p99_abs']:>10.2e} "
                  f"{same['max_abs']:>10.2e} {same['exact_zero_fraction']:>6.1%} {same['max_abs_At_minus_A']:>10.2e} "
                  f"{ctx['mean_abs']:>12.2e} {same['mean_abs'] / ctx['mean_abs']:>12.2e}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
