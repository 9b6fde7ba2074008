#!/usr/bin/env python
"""Plot training curves from one or more runs' metrics.jsonl into a PNG (several runs on one figure).

    python tools/plot_metrics.py runs/grpo runs/rlrt --output grpo_vs_rlrt.png
    python tools/plot_metrics.py runs/rlrt --keys reward/mean eval/avg@8 --smooth 5
"""

from __future__ import annotations

import argparse
import math
import os
import sys

DEFAULT_KEYS = ("reward/mean", "eval/pass@1", "response/length_mean", "actor/entropy", "rlrt/lambda",
                "rlrt/weight_mean", "loss/pg", "actor/grad_norm", "perf/step_time_s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl) or metrics.jsonl files")
    p.add_argument("--output", default=None, help="PNG path (default: <first run>/metrics.png)")
    p.add_argument("--keys", nargs="+", default=None,
                   help=f"metrics to plot, one panel each (default: those of {', '.join(DEFAULT_KEYS)} present)")
    p.add_argument("--labels", nargs="+", default=None, help="legend label per run (default: directory names)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (1: raw)")
    p.add_argument("--title", default=None, help="figure title")
    return p


def read_metrics(path: str) -> list[dict]:
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise SystemExit(f"error: {file}: no metrics.jsonl")
    from megatron_rlrt.data.errors import DatasetError
    from megatron_rlrt.data.readers import iter_jsonl

    try:
        return [row for _, row in iter_jsonl(file)]
    except DatasetError as exc:
        raise SystemExit(f"error: {exc}") from None


def series(rows: list[dict], key: str, smooth: int) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    xs, ys = [p[0] for p in pts], [float(p[1]) for p in pts]
    if smooth > 1 and ys:
        ys = [sum(ys[max(0, i - smooth + 1): i + 1]) / len(ys[max(0, i - smooth + 1): i + 1]) for i in range(len(ys))]
    return xs, ys


def plot(runs: list[str], output: str, keys=None, labels=None, smooth: int = 1, title: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [read_metrics(r) for r in runs]
    labels = labels or [os.path.basename(os.path.normpath(r)) for r in runs]
    if len(labels) != len(runs):
        raise SystemExit(f"error: {len(labels)} --labels for {len(runs)} runs")
    keys = keys or [k for k in DEFAULT_KEYS if any(k in row for rows in data for row in rows)]
    if not keys:
        raise SystemExit("error: none of the metrics to plot are in these runs")
    cols = min(3, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.4 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for rows, label in zip(data, labels):
            xs, ys = series(rows, key, smooth)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 3 else None, label=label)
        ax.set_title(key)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(runs) > 1 or labels:
        axes.flat[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = args.output or os.path.join(args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0]),
                                      "metrics.png")
    print(plot(args.runs, out, args.keys, args.labels, args.smooth, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
