#!/usr/bin/env python
"""Token-level distribution shift of fine-tuned policies from the base (paper sec. 6.3, Fig. 7,
after Meng et al.): on each fine-tuned policy's own rollouts of hard prompts, the per-position
JS(pi_ft || pi_base) over the full vocabulary -- (a) its CCDF, (b) the top-k overlap
(k = 1..20) at high-divergence positions (JS > 0.1), (c) how deep in the base distribution the
new top-1 token was (fraction of high-divergence positions whose new top-1 had base probability
below each threshold). Several fine-tuned checkpoints on one figure.

    python tools/distribution_shift.py --base Qwen3-8B --checkpoint grpo=runs/grpo \\
        --checkpoint rlrt=runs/rlrt --data dapo.parquet --max-hard-problems 30 \\
        --output-dir analysis/shift --tensor-model-parallel-size 2

Hard prompts: n_correct in --hard (default {0,1,2}) of --n-samples (8) base rollouts. JS is in
nats (natural log; at most ln 2). Both policies score the same tokens in the same megatron
forward code (policies mode of megatron_rlrt.analysis.scoring). Output (OUTPUT_DIR):
base/rollouts.jsonl, <checkpoint>/rollouts.jsonl, shift.json, shift.md, shift.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEPTHS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def build_parser() -> argparse.ArgumentParser:
    from megatron_rlrt.analysis import cli

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--base", required=True, help="the base policy (HF directory or megatron-rlrt checkpoint)")
    p.add_argument("--checkpoint", action="append", required=True, metavar="[LABEL=]PATH",
                   help="a fine-tuned policy of the same architecture; repeat for several")
    p.add_argument("--output-dir", required=True, help="where rollouts, table and figure go")
    p.add_argument("--hard", type=int, nargs="+", default=[0, 1, 2], help="n_correct values (of --n-samples) of hard prompts")
    p.add_argument("--max-hard-problems", type=int, default=30, help="hard prompts used (paper: 30)")
    p.add_argument("--ft-samples", type=int, default=2, help="rollouts of each fine-tuned policy per hard prompt")
    p.add_argument("--js-threshold", type=float, default=0.1, help="high-divergence positions: JS above this (paper: 0.1)")
    p.add_argument("--max-k", type=int, default=20, help="top-k overlap for k = 1..max-k (paper: 20)")
    cli.add_rollout_args(p)
    cli.add_model_args(p)
    return p


def shift_statistics(scores, js_threshold: float, max_k: int) -> dict:
    """Panels (a)-(c) from PositionScores of one fine-tuned policy (A) against the base (B)."""
    from megatron_rlrt.analysis.stats import ccdf, topk_overlap

    js = [float(x) for s in scores for x in s.js]
    xs = [10 ** (e / 4) for e in range(-20, 0)] + [math.log(2)]
    high = [(s, t) for s in scores for t in range(len(s)) if float(s.js[t]) > js_threshold]
    overlap = [sum(topk_overlap(s.top_ids_a[t].tolist(), s.top_ids_b[t].tolist(), k) for s, t in high) / len(high)
               if high else None for k in range(1, max_k + 1)]
    # the fine-tuned policy's top-1 where it differs from the base's: its probability under the base
    depth_p = [math.exp(float(s.top_a_logp_b[t, 0])) for s, t in high]
    depth = [sum(p < th for p in depth_p) / len(high) if high else None for th in DEPTHS]
    new_top1 = sum(int(s.top_ids_a[t, 0]) != int(s.top_ids_b[t, 0]) for s, t in high)
    return {"positions": len(js), "high_divergence": len(high), "share_high": len(high) / max(1, len(js)),
            "mean_js": sum(js) / max(1, len(js)), "high_with_new_top1": new_top1,
            "ccdf": {"x": xs, "y": ccdf(js, xs)}, "overlap": {"k": list(range(1, max_k + 1)), "y": overlap},
            "depth": {"threshold": list(DEPTHS), "y": depth}}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlrt.analysis import cli
    from megatron_rlrt.analysis.checkpoints import check_same_architecture, resolve

    def body():
        cli.require_generated(args, "distribution_shift", "rollouts of every policy")
        base = resolve(args.base, "base")
        fts = cli.named_checkpoints(args.checkpoint)
        if any(f.label == "base" for f in fts):
            raise ValueError("'base' is the base policy's label; name the fine-tuned checkpoints otherwise")
        check_same_architecture([base] + fts)
        return _run(args, base, fts)

    return cli.run_tool(body)


def _run(args, base, fts) -> int:
    from megatron_rlrt.analysis import cli, plots
    from megatron_rlrt.analysis import rollouts as R
    from megatron_rlrt.analysis.jobs import ScoreTask, run_scoring
    from megatron_rlrt.analysis.scoring import ScoreItem
    from megatron_rlrt.data.readers import iter_rows
    from megatron_rlrt.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(base.tokenizer_dir)
    base_records = cli.obtain_records(args, base, os.path.join(args.output_dir, "base"), tokenizer)
    hard = [r for r in base_records if r["n_correct"] in args.hard][: args.max_hard_problems]
    if not hard:
        raise ValueError(f"no hard prompt: none of {len(base_records)} problems has n_correct in {args.hard} "
                         f"of {args.n_samples} base rollouts")
    hard_rows = {int(r["id"].rpartition(":")[2]) for r in hard}
    # the hard prompts as a problem file of their own, so each policy generates on exactly these
    hard_path = os.path.join(args.output_dir, "hard_problems.jsonl")
    with open(hard_path, "w", encoding="utf-8") as f:
        for row_no, row in iter_rows(args.data):
            if row_no in hard_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tasks = []
    for ft in fts:
        ft_args = copy.copy(args)
        ft_args.data, ft_args.n_samples, ft_args.max_problems = hard_path, args.ft_samples, None
        records = cli.obtain_records(ft_args, ft, os.path.join(args.output_dir, ft.label.replace("/", "_")), tokenizer)
        items = [ScoreItem(i, r.prompt_ids, r.response_ids) for i, r in enumerate(R.flatten(records)) if r.response_ids]
        tasks.append(ScoreTask("policies", ft, items, b=base))
    run = cli.score_run(args, topk=args.max_k)
    scored = run_scoring(tasks, run)
    if not cli.is_writer():
        return 0
    stats = {ft.label: shift_statistics(list(s.values()), args.js_threshold, args.max_k) for ft, s in zip(fts, scored)}
    with open(os.path.join(args.output_dir, "shift.json"), "w", encoding="utf-8") as f:
        json.dump({"base": base.label, "hard_problems": len(hard), "js_threshold": args.js_threshold,
                   "checkpoints": stats}, f, indent=1)
    f3 = lambda x: "-" if x is None else f"{x:.3f}"
    lines = [f"Distribution shift from {base.label} on {len(hard)} hard prompts (JS in nats, high = JS > "
             f"{args.js_threshold:g})", "",
             "| checkpoint | positions | mean JS | share high | top-1 overlap | top-5 overlap | top-20 overlap | "
             "new top-1 base p < 1e-3 |", "|---|---|---|---|---|---|---|---|"]
    for label, s in stats.items():
        ov = s["overlap"]["y"]
        lines.append(f"| {label} | {s['positions']} | {s['mean_js']:.4f} | {s['share_high']:.4f} | {f3(ov[0])} | "
                     f"{f3(ov[min(4, len(ov) - 1)])} | {f3(ov[-1])} | {f3(s['depth']['y'][2])} |")
    with open(os.path.join(args.output_dir, "shift.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    panels = {label: {"ccdf": (s["ccdf"]["x"], s["ccdf"]["y"]),
                      "overlap": (s["overlap"]["k"], [float("nan") if v is None else v for v in s["overlap"]["y"]]),
                      "depth": (s["depth"]["threshold"], [float("nan") if v is None else v for v in s["depth"]["y"]])}
              for label, s in stats.items()}
    png = plots.distribution_shift(panels, os.path.join(args.output_dir, "shift.png"), args.js_threshold)
    print("\n".join(lines))
    print(f"[distribution_shift] wrote shift.md, shift.json, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
