#!/usr/bin/env python
"""Explore / exploit marker statistics (paper Fig. 3, App. D): which tokens the student chooses
against the teacher (D_hat_t > 0, explore) versus with it (D_hat_t < 0, exploit), scored with
Monroe et al.'s smoothed log-odds z (alpha = 0.5); |z| >= 3 kept; a volcano plot and a ranked table.

    python tools/marker_stats.py --checkpoint Qwen3-8B --rollouts evals/base/Qwen3-8B/dapo.jsonl \\
        --output-dir analysis/markers --tensor-model-parallel-size 2
    # App. D exactly: one correct + one wrong rollout per problem, vocabulary argmax/argmin of D_hat_t(v)
    python tools/marker_stats.py ... --select paired --corpus argmax --stopwords nltk_english.txt

Output (OUTPUT_DIR): markers.md (explore side by decreasing z, exploit side by increasing z),
markers.json (every scored token with counts and z), volcano.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from megatron_rlrt.analysis import cli

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", required=True, help="HF directory or megatron-rlrt checkpoint / run dir")
    p.add_argument("--output-dir", required=True, help="where the table and the plot go")
    p.add_argument("--select", default="correct", choices=["correct", "paired", "all"],
                   help="rollouts used: every correct one; one correct + one wrong per problem (App. D); all")
    p.add_argument("--corpus", default="sampled", choices=["sampled", "argmax"],
                   help="sampled: y_t by the sign of D_hat_t(y_t); argmax: argmax/argmin_v D_hat_t(v) per position (App. D)")
    p.add_argument("--alpha", type=float, default=0.5, help="log-odds smoothing (Monroe et al.; paper: 0.5)")
    p.add_argument("--z-threshold", type=float, default=3.0, help="keep tokens with |z| >= this (paper: 3)")
    p.add_argument("--min-count", type=int, default=30, help="score tokens seen at least this often in both corpora together")
    p.add_argument("--min-len", type=int, default=3, help="shortest token text scored (characters)")
    p.add_argument("--max-len", type=int, default=15, help="longest token text scored (characters)")
    p.add_argument("--any-chars", dest="alpha_only", action="store_false",
                   help="score every token text, not only ASCII alphabetic ones")
    p.add_argument("--lowercase", action="store_true", help="merge tokens that differ only in case")
    p.add_argument("--stopwords", default=None, help="file with one word per line to drop (e.g. NLTK's English list)")
    p.add_argument("--max-rollouts", type=int, default=None, help="use at most this many rollouts")
    cli.add_rollout_args(p)
    cli.add_teacher_args(p)
    cli.add_model_args(p)
    return p


def select_rollouts(flat, items, how: str):
    """Items with a teacher view, by --select (paired: first correct + first wrong per problem)."""
    usable = [(it, r) for it, r in zip(items, flat) if it.teacher_prompt_ids is not None and r.response_ids]
    if how == "correct":
        return [it for it, r in usable if r.correct]
    if how == "all":
        return [it for it, _ in usable]
    by_problem: dict = {}
    for it, r in usable:
        by_problem.setdefault(r.problem, {}).setdefault(r.correct, it)
    return [it for pair in by_problem.values() if len(pair) == 2 for it in (pair[True], pair[False])]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlrt.analysis import cli
    from megatron_rlrt.analysis.checkpoints import resolve

    def body():
        if args.stopwords and not os.path.isfile(args.stopwords):
            raise FileNotFoundError(f"--stopwords {args.stopwords}: no such file")
        return _run(args, resolve(args.checkpoint))

    return cli.run_tool(body)


def _run(args, ref) -> int:
    from megatron_rlrt.analysis import cli, plots
    from megatron_rlrt.analysis.jobs import ScoreTask, run_scoring
    from megatron_rlrt.analysis.markers import corpora, marker_table
    from megatron_rlrt.tokenizer import load_tokenizer

    os.makedirs(args.output_dir, exist_ok=True)
    tokenizer = load_tokenizer(ref.tokenizer_dir)
    _, flat, items, vstats = cli.rollout_views(args, ref, args.output_dir, tokenizer)
    chosen = select_rollouts(flat, items, args.select)[: args.max_rollouts]
    if not chosen:
        raise ValueError(f"no rollout for --select {args.select}: {vstats.built} of {len(flat)} rollouts have a teacher "
                         f"view (context {args.teacher_context!r})")
    [scores] = run_scoring([ScoreTask("views", ref, chosen)], cli.score_run(args, topk=1))
    if not cli.is_writer():
        return 0
    stop = None
    if args.stopwords:
        with open(args.stopwords, encoding="utf-8") as f:
            stop = {w.strip().lower() for w in f if w.strip()}
    explore, exploit = corpora(scores.values(), args.corpus)
    rows = marker_table(explore, exploit, lambda i: tokenizer.decode([int(i)]), args.min_count, args.alpha,
                        args.alpha_only, args.min_len, args.max_len, args.lowercase, stop)
    kept = [r for r in rows if abs(r["z"]) >= args.z_threshold]
    exp_side = [r for r in kept if r["z"] > 0]
    xpl_side = sorted((r for r in kept if r["z"] < 0), key=lambda r: r["z"])
    out = {"checkpoint": ref.label, "rollouts": len(scores), "corpus": args.corpus, "select": args.select,
           "explore_total": sum(explore.values()), "exploit_total": sum(exploit.values()),
           "scored_tokens": len(rows), "z_threshold": args.z_threshold, "alpha": args.alpha, "tokens": rows}
    with open(os.path.join(args.output_dir, "markers.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    lines = [f"Markers of {ref.label}: {len(scores)} rollouts, corpus '{args.corpus}' (E = {out['explore_total']}, "
             f"X = {out['exploit_total']} tokens), {len(rows)} token types scored, |z| >= {args.z_threshold:g}: "
             f"{len(exp_side)} explore, {len(xpl_side)} exploit", ""]
    for title, side in (("explore (chosen against the teacher)", exp_side), ("exploit (teacher-favoured)", xpl_side)):
        lines += [f"### {title}", "", "| rank | token | z | n_explore | n_exploit |", "|---|---|---|---|---|"]
        lines += [f"| {i} | `{r['token']}` | {r['z']:+.2f} | {r['explore']} | {r['exploit']} |" for i, r in enumerate(side, 1)]
        lines.append("")
    with open(os.path.join(args.output_dir, "markers.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    png = plots.volcano(rows, os.path.join(args.output_dir, "volcano.png"), args.z_threshold)
    print("\n".join(lines[:1]))
    print(f"[marker_stats] wrote markers.md, markers.json, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
