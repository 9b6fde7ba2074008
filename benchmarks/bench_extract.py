#!/usr/bin/env python
"""Answer extraction on adversarial responses (issue #13): time at n and 4n repeats of each
pattern, for the linear extractor and for the previous per-candidate scan / lazy regex (the
baseline: ``megatron_rlrt/reward/testing.py``'s reference rules, also the tests' oracle). Linear
code grows ~4x from n to 4n, quadratic ~16x.

    python benchmarks/bench_extract.py --repeats 2000 8000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlrt.reward.extract import extract_math_answer, extract_tagged_answer  # noqa: E402
from megatron_rlrt.reward.testing import PATHOLOGICAL_PIECES, reference_answer_tag, reference_last_boxed  # noqa: E402


def _time(fn, text):
    start = time.perf_counter()
    fn(text)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, nargs=2, default=[2000, 8000], help="n and a larger n")
    args = p.parse_args()
    ours_of = {"\\boxed{": extract_math_answer, "<answer>": extract_tagged_answer}
    old_of = {"\\boxed{": reference_last_boxed, "<answer>": reference_answer_tag}
    cases = [(name, piece, ours_of[piece], old_of[piece]) for name, piece in PATHOLOGICAL_PIECES.items()]
    print(f"{'input':<14}{'n':>7}{'chars':>9}{'ours s':>10}{'old s':>10}{'old/ours':>10}")
    for name, piece, ours, old in cases:
        times = []
        for n in args.repeats:
            text = piece * n
            t_ours, t_old = _time(ours, text), _time(old, text)
            times.append((t_ours, t_old))
            print(f"{name:<14}{n:>7}{len(text):>9}{t_ours:>10.4f}{t_old:>10.3f}{t_old / max(t_ours, 1e-9):>10.0f}")
        k = args.repeats[1] / args.repeats[0]
        print(f"{name:<14} growth for {k:.0f}x input: ours {times[1][0] / max(times[0][0], 1e-9):.1f}x, "
              f"old {times[1][1] / max(times[0][1], 1e-9):.1f}x")


if __name__ == "__main__":
    main()
