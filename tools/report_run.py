#!/usr/bin/env python
"""Summarise a training run: held-out accuracy before vs after, reward trend, and the plot.

    python tools/report_run.py runs/quickstart
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.plot_metrics import plot, read_metrics  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run directory (with metrics.jsonl)")
    p.add_argument("--plot", default=None, help="PNG path (default: <run>/metrics.png); 'none' to skip")
    return p


def summary(rows: list[dict]) -> dict:
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    before = evals[0] if evals and evals[0].get("step", 0) == 0 else {}
    after = evals[-1] if evals and evals[-1] is not before else {}
    train = [r for r in rows if "reward/mean" in r]
    k = max(1, len(train) // 5)
    return {"before": {a: b for a, b in before.items() if a.startswith("eval/")},
            "after": {a: b for a, b in after.items() if a.startswith("eval/") and a != "eval/final"},
            "reward_first": sum(r["reward/mean"] for r in train[:k]) / k if train else None,
            "reward_last": sum(r["reward/mean"] for r in train[-k:]) / k if train else None,
            "steps": len(train), "window": k,
            "step_time": sum(r.get("perf/step_time_s", 0) for r in train) / max(1, len(train)),
            "reward_timeouts": int(sum(r.get("reward/timeouts", 0) for r in train))}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rows = read_metrics(args.run)
    s = summary(rows)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.run}: held-out accuracy")
    table.add_column("metric")
    table.add_column("before RL", justify="right")
    table.add_column("after RL", justify="right")
    for key in sorted(set(s["before"]) | set(s["after"])):
        b, a = s["before"].get(key), s["after"].get(key)
        table.add_row(key, "-" if b is None else f"{b:.3f}", "-" if a is None else f"{a:.3f}")
    if s["reward_first"] is not None:
        table.add_row(f"train reward (mean of first/last {s['window']} steps)", f"{s['reward_first']:.3f}",
                      f"{s['reward_last']:.3f}")
    console = Console()
    console.print(table)
    console.print(f"{s['steps']} RL steps, {s['step_time']:.1f} s per step on average")
    if s["reward_timeouts"]:
        console.print(f"[yellow]{s['reward_timeouts']} rollouts hit the scoring timeout (--reward-timeout) and scored 0: "
                      "on a busy machine such a run does not reproduce exactly[/yellow]")
    if args.plot != "none":
        out = plot([args.run], args.plot or os.path.join(args.run, "metrics.png"))
        console.print(f"reward plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
