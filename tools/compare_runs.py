#!/usr/bin/env python
"""Compare training runs of several methods over seeds: a markdown table and figures.

    python tools/compare_runs.py outputs/fidelity-quick/runs/* --baseline-eval outputs/fidelity-quick/step0/eval \\
        --output-dir outputs/fidelity-quick/report

Each RUN_DIR is a trainer --save directory (its metrics.jsonl), optionally with the held-out
evaluation of its final checkpoint in RUN_DIR/eval (tools/evaluate.py --output-dir RUN_DIR/eval:
summary.json and <label>/<benchmark>.jsonl). Runs are grouped into methods by their directory
name (--group-regex; default: "<method>-s<seed>"), and every number is reported as the mean over
seeds with [min, max] across seeds:

  train reward     mean of reward/mean over the last --last steps
  reward, all      mean of reward/mean over every step (area under the reward curve / steps: how fast
                   the reward rose, not only where it ended)
  held-out avg@n   mean correctness of n samples per held-out problem; pass@k for k = 1..n
                   (Chen et al.'s unbiased estimator) with a 95 % confidence interval over
                   problems (normal approximation of the per-problem values, seeds averaged)
  length, entropy  response/length_mean and actor/entropy over the last --last steps
  RLRT weights     rlrt/d_mean, rlrt/d_positive_frac, rlrt/clip_frac and rlrt/adv_abs_shift_mean
                   (mean |A_t - A| over response tokens: how far the weights moved the advantages)
  vs reference     --reference METHOD: per seed, each method's number minus the reference's on the
                   same seed (same data order and sampling seed), mean [min, max] over the shared
                   seeds and how many seeds the difference is > 0: the effect size and its spread
  strategies       among CORRECT held-out responses: the share of each strategy and the entropy
                   (nats) of that distribution (--strategy-classifier names the function that
                   reads a response's strategy; `none` turns it off)

Writes OUTPUT_DIR/report.md (the table), summary.json (every number, per run and per method),
training.png (reward, response length, entropy, D_t and clip fraction vs step: mean line and a
min-max band over seeds) and passk.png (pass@k per method with its confidence band).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (column, metrics.jsonl key) of the per-step quantities averaged over the last --last steps
TRAIN_COLUMNS = (
    ("train reward", "reward/mean"),
    ("resp. length", "response/length_mean"),
    ("entropy", "actor/entropy"),
    ("rlrt/d_mean", "rlrt/d_mean"),
    ("D_t>0 frac", "rlrt/d_positive_frac"),
    ("clip frac", "rlrt/clip_frac"),
    ("mean |A_t - A|", "rlrt/adv_abs_shift_mean"),  # how much the token weights moved the advantages
)
ALL_STEPS_REWARD = "reward, all steps"
CURVES = (("reward/mean", "training reward"), ("response/length_mean", "response length (tokens)"),
          ("actor/entropy", "entropy"), ("rlrt/d_mean", "rlrt/d_mean (nats)"), ("rlrt/clip_frac", "RLRT clip fraction"))
DEFAULT_CLASSIFIER = "megatron_rlrt.data.strategy_task:classify"


class RunError(ValueError):
    """A run directory that cannot be read; the message names the path and what was expected."""


@dataclass
class Run:
    path: str
    group: str
    seed: str
    steps: dict[int, dict] = field(default_factory=dict)  # step -> metrics row
    eval_summary: Optional[dict] = None  # evaluate.py's summary for this run's checkpoint
    eval_records: Optional[list] = None  # per-problem records (n_correct, correct, responses)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="trainer --save directories (each with metrics.jsonl)")
    p.add_argument("--output-dir", required=True, help="where report.md, summary.json, training.png, passk.png go")
    p.add_argument("--group-regex", default=r"^(?P<group>.+)-s(?P<seed>\d+)$",
                   help="regex on each run directory's name with named groups 'group' (the method) and optionally "
                        "'seed'; a name that does not match is a group of its own")
    p.add_argument("--last", type=int, default=5, help="steps at the end of each run averaged for the per-run numbers")
    p.add_argument("--eval-subdir", default="eval", help="where in a run directory tools/evaluate.py wrote its output")
    p.add_argument("--benchmark", default=None,
                   help="which benchmark of the evaluation to report (default: the only one; required if several)")
    p.add_argument("--baseline-eval", default=None,
                   help="an evaluate.py output directory (e.g. of the warm-up model) shown as its own row 'step 0'")
    p.add_argument("--strategy-classifier", default=DEFAULT_CLASSIFIER,
                   help="module:function mapping a response text to a strategy name (for the strategy shares and "
                        "entropy among correct held-out responses); 'none' turns the strategy columns off")
    p.add_argument("--reference", default="grpo",
                   help="method the paired-by-seed differences are taken against (default grpo; 'none' or a "
                        "method that is not among the runs: no difference table)")
    p.add_argument("--title", default="", help="title prefix of the figures")
    return p


# --- reading -----------------------------------------------------------------------------------


def _jsonl_rows(path: str):
    """(line, object) per row via the data layer's reader; its errors become one RunError."""
    from megatron_rlrt.data.errors import DatasetError
    from megatron_rlrt.data.readers import iter_jsonl

    try:
        yield from iter_jsonl(path)
    except DatasetError as exc:
        raise RunError(str(exc)) from None


def read_metrics(path: str) -> dict[int, dict]:
    """step -> row of a metrics.jsonl (a later row of the same step updates the earlier one)."""
    steps: dict[int, dict] = {}
    for n, row in _jsonl_rows(path):
        if not isinstance(row.get("step"), int):
            raise RunError(f"{path}, row {n}: expected a JSON object with an integer 'step'")
        steps.setdefault(row["step"], {}).update(row)
    return steps


def read_eval(directory: str, benchmark: Optional[str]) -> tuple[Optional[dict], Optional[list]]:
    """(summary, per-problem records) of an evaluate.py output directory with ONE checkpoint."""
    summary_path = os.path.join(directory, "summary.json")
    if not os.path.isfile(summary_path):
        return None, None
    try:
        with open(summary_path, encoding="utf-8") as f:
            table = json.load(f)
    except json.JSONDecodeError as exc:
        raise RunError(f"{summary_path}: not valid JSON ({exc.msg})") from None
    if not isinstance(table, dict) or not table:
        raise RunError(f"{summary_path}: expected {{benchmark: {{checkpoint: summary}}}} as evaluate.py writes it")
    if benchmark is None:
        if len(table) > 1:
            raise RunError(f"{summary_path} has benchmarks {sorted(table)}: choose one with --benchmark")
        benchmark = next(iter(table))
    if benchmark not in table:
        raise RunError(f"{summary_path} has no benchmark {benchmark!r} (has {sorted(table)})")
    per_ckpt = table[benchmark]
    if len(per_ckpt) != 1:
        raise RunError(f"{summary_path}: expected the evaluation of one checkpoint, found {sorted(per_ckpt)}")
    label, summary = next(iter(per_ckpt.items()))
    records_path = os.path.join(directory, label.replace("/", "_"), f"{benchmark}.jsonl")
    records = None
    if os.path.isfile(records_path):
        records = [row for _, row in _jsonl_rows(records_path)]
    return summary, records


def load_run(path: str, regex: re.Pattern, eval_subdir: str, benchmark: Optional[str]) -> Run:
    if not os.path.isdir(path):
        raise RunError(f"{path}: no such directory")
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise RunError(f"{path}: no metrics.jsonl (expected a trainer --save directory)")
    name = os.path.basename(os.path.normpath(path))
    m = regex.match(name)
    group = m.group("group") if m and "group" in regex.groupindex else name
    seed = m.group("seed") if m and "seed" in regex.groupindex else ""
    run = Run(path, group, seed, read_metrics(metrics))
    if not any("reward/mean" in row for row in run.steps.values()):
        raise RunError(f"{metrics}: no step has reward/mean (is this a training run's metrics file?)")
    run.eval_summary, run.eval_records = read_eval(os.path.join(path, eval_subdir), benchmark)
    return run


# --- numbers -----------------------------------------------------------------------------------


def tail_mean(run: Run, key: str, last: int) -> Optional[float]:
    """Mean of ``key`` over the last ``last`` training steps that have it (None: never logged)."""
    values = [run.steps[s][key] for s in sorted(run.steps) if _is_num(run.steps[s].get(key))]
    values = values[-last:]
    return sum(values) / len(values) if values else None


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def spread(values: Sequence[Optional[float]]) -> Optional[tuple[float, float, float]]:
    """(mean, min, max) over the runs that have a value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return sum(vals) / len(vals), min(vals), max(vals)


def pass_at_k_per_problem(records: list, n: int, k: int) -> dict[str, float]:
    from megatron_rlrt.eval.metrics import pass_at_k

    return {r["id"]: pass_at_k(n, int(r["n_correct"]), k) for r in records}


def passk_with_ci(runs: Sequence[Run], z: float = 1.96) -> dict[int, tuple[float, float, float]]:
    """k -> (mean, lo, hi): per problem, pass@k averaged over the seeds that evaluated it; then the
    mean over problems with a normal-approximation interval mean +- z * sd / sqrt(P)."""
    evaluated = [r for r in runs if r.eval_records]
    if not evaluated:
        return {}
    ns = {int(rec["n"]) for r in evaluated for rec in r.eval_records}
    if len(ns) != 1:
        raise RunError(f"runs {[r.path for r in evaluated]} were evaluated with different n {sorted(ns)}")
    n = ns.pop()
    out = {}
    for k in range(1, n + 1):
        per_seed = [pass_at_k_per_problem(r.eval_records, n, k) for r in evaluated]
        ids = sorted(set().union(*per_seed))
        per_problem = [sum(d[i] for d in per_seed if i in d) / sum(i in d for d in per_seed) for i in ids]
        mean = sum(per_problem) / len(per_problem)
        sd = math.sqrt(sum((x - mean) ** 2 for x in per_problem) / (len(per_problem) - 1)) if len(per_problem) > 1 else 0.0
        half = z * sd / math.sqrt(len(per_problem))
        out[k] = (mean, max(0.0, mean - half), min(1.0, mean + half))
    return out


def strategy_stats(records: list, classify: Callable[[str], str]) -> Optional[dict]:
    """Shares of strategies among correct responses and their entropy in nats."""
    counts: dict[str, int] = {}
    for rec in records:
        for text, ok in zip(rec.get("responses") or [], rec.get("correct") or []):
            if ok:
                name = classify(text)
                counts[name] = counts.get(name, 0) + 1
    total = sum(counts.values())
    if not total:
        return None
    shares = {k: v / total for k, v in sorted(counts.items())}
    entropy = -sum(p * math.log(p) for p in shares.values() if p > 0)
    return {"correct_responses": total, "shares": shares, "entropy": entropy}


def load_classifier(spec: str) -> Optional[Callable[[str], str]]:
    if spec == "none":
        return None
    module, _, name = spec.partition(":")
    if not name:
        raise RunError(f"--strategy-classifier {spec!r}: expected module:function or 'none'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise RunError(f"--strategy-classifier {spec!r}: {exc}") from None


def run_numbers(run: Run, last: int, classify) -> dict:
    out = {col: tail_mean(run, key, last) for col, key in TRAIN_COLUMNS}
    out[ALL_STEPS_REWARD] = tail_mean(run, "reward/mean", len(run.steps) or 1)
    out["steps"] = max(s for s in run.steps if "reward/mean" in run.steps[s])
    if run.eval_summary:
        n = int(run.eval_summary["n"])
        out["n"] = n
        out["avg@n"] = run.eval_summary[f"avg@{n}"]
        out["pass@k"] = {int(k): v for k, v in run.eval_summary["pass@k"].items()}
    if run.eval_records and classify:
        out["strategies"] = strategy_stats(run.eval_records, classify)
    return out


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    return groups


# --- output ------------------------------------------------------------------------------------


def fmt(s: Optional[tuple[float, float, float]], digits: int = 3, single: bool = False) -> str:
    if s is None:
        return "-"
    mean, lo, hi = s
    return f"{mean:.{digits}f}" if single else f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def build_table(groups: dict[str, list[Run]], per_run: dict[str, dict], baseline: Optional[dict],
                baseline_strategies: Optional[dict]) -> tuple[str, dict]:
    """Markdown table (mean [min, max] over seeds) and the per-method numbers behind it."""
    ns = {per_run[r.path]["n"] for runs in groups.values() for r in runs if "n" in per_run[r.path]}
    n = max(ns) if ns else None
    cols = ["method", "seeds", "steps", ALL_STEPS_REWARD] + [c for c, _ in TRAIN_COLUMNS]
    if n:
        cols += [f"held-out avg@{n}", "pass@1", f"pass@{n}"]
    cols += ["strategy entropy (correct)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    methods = {}
    if baseline is not None:
        bn = int(baseline["n"])
        cells = ["step 0 (warm-up)", "-", "0"] + ["-"] * (len(TRAIN_COLUMNS) + 1)
        if n:
            cells += [f"{baseline[f'avg@{bn}']:.3f}", f"{baseline['pass@k']['1']:.3f}",
                      f"{baseline['pass@k'].get(str(n), float('nan')):.3f}"]
        cells += [f"{baseline_strategies['entropy']:.3f}" if baseline_strategies else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for name, runs in groups.items():
        nums = [per_run[r.path] for r in runs]
        single = len(runs) == 1
        row = {"seeds": [r.seed for r in runs], "steps": sorted({x["steps"] for x in nums})}
        cells = [name, str(len(runs)), "/".join(map(str, row["steps"]))]
        for col in [ALL_STEPS_REWARD] + [c for c, _ in TRAIN_COLUMNS]:
            row[col] = spread([x[col] for x in nums])
            cells.append(fmt(row[col], single=single))
        if n:
            row["avg@n"] = spread([x.get("avg@n") for x in nums])
            row["pass@1"] = spread([x.get("pass@k", {}).get(1) for x in nums])
            row[f"pass@{n}"] = spread([x.get("pass@k", {}).get(n) for x in nums])
            cells += [fmt(row["avg@n"], single=single), fmt(row["pass@1"], single=single),
                      fmt(row[f"pass@{n}"], single=single)]
        ent = spread([(x.get("strategies") or {}).get("entropy") for x in nums])
        row["strategy_entropy"] = ent
        cells.append(fmt(ent, single=single))
        lines.append("| " + " | ".join(cells) + " |")
        methods[name] = row
    note = ("Each cell: mean over seeds [min, max]; train columns average the last steps of each run; held-out "
            "columns come from each run's final checkpoint.")
    return "\n".join(lines) + "\n\n" + note + "\n", methods


# (column, per-run key) of the paired differences: higher is better for each
PAIRED = ((ALL_STEPS_REWARD, ALL_STEPS_REWARD), ("train reward (last)", "train reward"), ("held-out avg@n", "avg@n"))


def paired_differences(groups: dict[str, list[Run]], per_run: dict[str, dict], reference: str) -> tuple[str, dict]:
    """Per seed: method minus ``reference`` on the same seed; mean [min, max] over the seeds both ran
    and the number of seeds with a positive difference."""
    if reference not in groups:
        return "", {}
    ref = {r.seed: per_run[r.path] for r in groups[reference]}
    out = {}
    cols = [c for c, _ in PAIRED]
    lines = ["| method | seeds paired | " + " | ".join(f"{c}: diff [min, max] (seeds > 0)" for c in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for name, runs in groups.items():
        if name == reference:
            continue
        pairs = [(per_run[r.path], ref[r.seed]) for r in runs if r.seed in ref]
        if not pairs:
            continue
        row, cells = {"seeds": len(pairs)}, [name, str(len(pairs))]
        for col, key in PAIRED:  # (no pass@1: it equals avg@n, c/n per problem)
            diffs = [a[key] - b[key] for a, b in pairs if a.get(key) is not None and b.get(key) is not None]
            if not diffs:
                cells.append("-")
                continue
            row[col] = {"mean": sum(diffs) / len(diffs), "min": min(diffs), "max": max(diffs),
                        "positive": sum(d > 0 for d in diffs), "n": len(diffs)}
            cells.append(f"{row[col]['mean']:+.3f} [{row[col]['min']:+.3f}, {row[col]['max']:+.3f}] "
                         f"({row[col]['positive']}/{len(diffs)})")
        out[name] = row
        lines.append("| " + " | ".join(cells) + " |")
    if not out:
        return "", {}
    return (f"Difference from {reference}, paired by seed (same data order and sampling seed): mean [min, max] over "
            "seeds, and in how many seeds the method is higher:\n\n" + "\n".join(lines) + "\n"), out


def strategy_table(groups: dict[str, list[Run]], per_run: dict[str, dict], baseline_strategies: Optional[dict]) -> str:
    rows = []
    if baseline_strategies:
        rows.append(("step 0 (warm-up)", baseline_strategies["shares"]))
    for name, runs in groups.items():
        shares: dict[str, list[float]] = {}
        stats = [per_run[r.path].get("strategies") for r in runs]
        stats = [s for s in stats if s]
        if not stats:
            continue
        for s in stats:
            for k in s["shares"]:
                shares.setdefault(k, [])
        rows.append((name, {k: sum(s["shares"].get(k, 0.0) for s in stats) / len(stats) for k in shares}))
    if not rows:
        return ""
    names = sorted({k for _, sh in rows for k in sh})
    lines = ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for name, sh in rows:
        lines.append(f"| {name} | " + " | ".join(f"{sh.get(k, 0.0):.2f}" for k in names) + " |")
    return "Strategy shares among correct held-out responses (mean over seeds):\n\n" + "\n".join(lines) + "\n"


def plot_training(groups: dict[str, list[Run]], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    colors = {name: f"C{i % 10}" for i, name in enumerate(groups)}  # one colour per method in every panel
    for ax, (key, label) in zip(axes, CURVES):
        for name, runs in groups.items():
            steps = sorted({s for r in runs for s in r.steps if _is_num(r.steps[s].get(key)) and s > 0})
            if not steps:
                continue
            per = [[r.steps[s][key] for r in runs if _is_num(r.steps.get(s, {}).get(key))] for s in steps]
            mean = [sum(v) / len(v) for v in per]
            ax.plot(steps, mean, label=f"{name} (n={len(runs)})", color=colors[name])
            if len(runs) > 1:
                ax.fill_between(steps, [min(v) for v in per], [max(v) for v in per], alpha=0.2, color=colors[name])
        ax.set_xlabel("RL step")
        ax.set_title(label, fontsize=10)
    for ax in axes:  # each panel names the methods it shows (GRPO logs no D_t)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.suptitle(f"{title}training curves: mean over seeds, band = min..max".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_passk(curves: dict[str, dict[int, tuple[float, float, float]]], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        ks = sorted(curve)
        line, = ax.plot(ks, [curve[k][0] for k in ks], marker="o", ms=3, label=name)
        ax.fill_between(ks, [curve[k][1] for k in ks], [curve[k][2] for k in ks], alpha=0.15, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("held-out pass@k")
    ax.set_title(f"{title}pass@k (band: 95% CI over problems)".strip(), fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plain(x):
    if isinstance(x, tuple):
        return {"mean": x[0], "min": x[1], "max": x[2]}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def compare(args) -> str:
    try:
        regex = re.compile(args.group_regex)
    except re.error as exc:
        raise RunError(f"--group-regex {args.group_regex!r}: {exc}") from None
    if args.last < 1:
        raise RunError(f"--last must be >= 1, got {args.last}")
    classify = load_classifier(args.strategy_classifier)
    runs = [load_run(p, regex, args.eval_subdir, args.benchmark) for p in args.runs]
    groups = group_runs(runs)
    per_run = {r.path: run_numbers(r, args.last, classify) for r in runs}
    baseline = baseline_records = None
    if args.baseline_eval:
        if not os.path.isdir(args.baseline_eval):
            raise RunError(f"--baseline-eval {args.baseline_eval}: no such directory")
        baseline, baseline_records = read_eval(args.baseline_eval, args.benchmark)
        if baseline is None:
            raise RunError(f"--baseline-eval {args.baseline_eval}: no summary.json (an evaluate.py --output-dir?)")
    baseline_strategies = strategy_stats(baseline_records, classify) if baseline_records and classify else None
    table, methods = build_table(groups, per_run, baseline, baseline_strategies)
    strategies = strategy_table(groups, per_run, baseline_strategies) if classify else ""
    paired_md, paired = paired_differences(groups, per_run, args.reference)
    curves = {name: passk_with_ci(rs) for name, rs in groups.items()}
    if baseline_records:
        base = Run(args.baseline_eval, "step 0", "", {}, baseline, baseline_records)
        curves = {"step 0 (warm-up)": passk_with_ci([base]), **curves}
    curves = {k: v for k, v in curves.items() if v}
    os.makedirs(args.output_dir, exist_ok=True)
    title = f"{args.title}: " if args.title else ""
    figures = [plot_training(groups, os.path.join(args.output_dir, "training.png"), title)]
    if curves:
        figures.append(plot_passk(curves, os.path.join(args.output_dir, "passk.png"), title))
    ks_shown = sorted({k for c in curves.values() for k in c if k & (k - 1) == 0})
    passk_md = ""
    if curves:
        passk_md = ("Held-out pass@k, mean [95% CI over problems]:\n\n| method | "
                    + " | ".join(f"pass@{k}" for k in ks_shown) + " |\n|" + "---|" * (len(ks_shown) + 1) + "\n")
        for name, c in curves.items():
            passk_md += f"| {name} | " + " | ".join(
                f"{c[k][0]:.3f} [{c[k][1]:.3f}, {c[k][2]:.3f}]" if k in c else "-" for k in ks_shown) + " |\n"
    report = "\n".join(x for x in (table, paired_md, passk_md, strategies) if x)
    with open(os.path.join(args.output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(report)
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(_plain({"runs": {r.path: {"group": r.group, "seed": r.seed, **per_run[r.path]} for r in runs},
                          "methods": methods, "paired_vs_reference": {"reference": args.reference, **paired},
                          "passk_ci": curves,
                          "baseline": {"eval": baseline, "strategies": baseline_strategies} if baseline else None}),
                  f, indent=1)
    return report + "\nfigures: " + ", ".join(figures) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(compare(args))
    except (RunError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
