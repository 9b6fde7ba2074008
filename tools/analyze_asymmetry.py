#!/usr/bin/env python
"""Per-position information asymmetry D_bar_t = KL(P_S || P_T) of a checkpoint's rollouts (paper
Fig. 2, 10, 12-13): full-trajectory heatmaps (HTML + PNG), the critical positions with their
explore / exploit candidates, and how sparse the critical positions are.

P_S is the policy given the prompt, P_T the same policy given the trainer's teacher prompt
(privileged context c: by default a successful peer rollout of the same problem), both scored in
ONE packed megatron forward over the full vocabulary -- what the RLRT trainer computes.

    python tools/analyze_asymmetry.py --checkpoint runs/rlrt-8b --rollouts evals/rlrt/rlrt-8b/dapo.jsonl \\
        --output-dir analysis/asym --tensor-model-parallel-size 2
    python tools/analyze_asymmetry.py --checkpoint Qwen3-8B --data dapo_100.parquet --n-samples 8 \\
        --output-dir analysis/asym-base

Output (OUTPUT_DIR): asymmetry.jsonl (per rollout: tokens, D_bar_t, D_hat_t(y_t), critical
positions with candidates), heatmaps.html, heatmap_<i>.png for the first --png-rollouts rollouts,
critical.md, summary.json (sparsity: share of positions with D_bar_t above each threshold).
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
    p.add_argument("--output-dir", required=True, help="where the tables and figures go")
    p.add_argument("--select", default="correct", choices=["correct", "all"],
                   help="which rollouts to analyse (the paper's examples are correct rollouts)")
    p.add_argument("--max-rollouts", type=int, default=64, help="analyse at most this many rollouts")
    p.add_argument("--critical", type=int, default=3, help="critical positions (largest D_bar_t) per rollout")
    p.add_argument("--candidates", type=int, default=4, help="explore / exploit candidates shown per critical position")
    p.add_argument("--topk", type=int, default=100, help="candidate sets: union of student and teacher top-K (paper: 100)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.5, 1.0],
                   help="D_bar_t thresholds (nats) for the sparsity statistics")
    p.add_argument("--png-rollouts", type=int, default=2, help="rollouts drawn as PNG heatmaps")
    cli.add_rollout_args(p)
    cli.add_teacher_args(p)
    cli.add_model_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlrt.analysis import cli
    from megatron_rlrt.analysis.checkpoints import resolve

    return cli.run_tool(lambda: _run(args, resolve(args.checkpoint)))


def _run(args, ref) -> int:
    from megatron_rlrt.analysis import asymmetry as A
    from megatron_rlrt.analysis import cli, plots
    from megatron_rlrt.analysis.jobs import ScoreTask, run_scoring
    from megatron_rlrt.analysis.stats import sparsity
    from megatron_rlrt.tokenizer import load_tokenizer

    os.makedirs(args.output_dir, exist_ok=True)
    tokenizer = load_tokenizer(ref.tokenizer_dir)
    _, flat, items, vstats = cli.rollout_views(args, ref, args.output_dir, tokenizer)
    chosen = [it for it, r in zip(items, flat) if it.teacher_prompt_ids is not None
              and (args.select == "all" or r.correct) and r.response_ids][: args.max_rollouts]
    if not chosen:
        raise ValueError(f"no rollout to analyse: {vstats.built} of {len(flat)} rollouts got a teacher view "
                         f"(context {args.teacher_context!r}: a peer context needs a problem with 2+ correct rollouts), "
                         f"--select {args.select}")
    [scores] = run_scoring([ScoreTask("views", ref, chosen)], cli.score_run(args, args.topk))
    if not cli.is_writer():
        return 0

    def tok(i):
        return tokenizer.decode([int(i)])

    entries, all_d = [], []
    path = os.path.join(args.output_dir, "asymmetry.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for it in chosen:
            s, r = scores[it.key], flat[it.key]
            crit = A.critical_positions(s, args.critical, args.candidates)
            for c in crit:
                c["token"] = tok(c["token_id"])
                for side in ("explore", "exploit"):
                    for x in c[side]:
                        x["token"] = tok(x["id"])
            rec = {"id": r.meta["id"], "sample": r.sample, "correct": r.correct, "tokens": [tok(i) for i in s.token_ids],
                   "d_bar": [round(float(v), 6) for v in s.kl], "d_hat": [round(float(v), 6) for v in s.d_hat],
                   "critical": crit}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            all_d.extend(rec["d_bar"])
            entries.append({**rec, "header": f"{r.meta['id']} sample {r.sample} "
                                             f"({'correct' if r.correct else 'wrong'}, {len(s)} tokens)"})
    html_path = os.path.join(args.output_dir, "heatmaps.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(A.html_page(entries, f"D_bar_t heatmaps: {ref.label}"))
    pngs = [plots.asymmetry_heatmap(e["tokens"], e["d_bar"], os.path.join(args.output_dir, f"heatmap_{i}.png"),
                                    title=e["header"]) for i, e in enumerate(entries[: args.png_rollouts])]
    lines = ["| rollout | t | token | D_bar_t | D_hat_t(y_t) | explore (P_S > P_T) | exploit (P_T > P_S) |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        for c in e["critical"]:
            fmt = lambda cs: ", ".join(f"`{x['token']!r}` {x['p_student']:.2f}/{x['p_teacher']:.2f}" for x in cs)
            lines.append(f"| {e['id']}#{e['sample']} | {c['position']} | `{c['token']!r}` | {c['d_bar']:.4g} | "
                         f"{c['d_hat']:+.3g} | {fmt(c['explore'])} | {fmt(c['exploit'])} |")
    with open(os.path.join(args.output_dir, "critical.md"), "w", encoding="utf-8") as f:
        f.write("Critical positions (largest D_bar_t per rollout); candidates as P_S/P_T from the union of both "
                f"top-{args.topk} sets\n\n" + "\n".join(lines) + "\n")
    srt = sorted(all_d)
    summary = {"checkpoint": ref.label, "rollouts": len(entries), "positions": len(all_d),
               "teacher_views": vars(vstats), "mean_d_bar": sum(all_d) / len(all_d),
               "median_d_bar": srt[len(srt) // 2], "p99_d_bar": srt[min(len(srt) - 1, int(0.99 * len(srt)))],
               "max_d_bar": srt[-1], "share_above": sparsity(all_d, args.thresholds),
               "top1pct_share_of_total_d_bar": sum(srt[-max(1, len(srt) // 100):]) / max(sum(srt), 1e-30)}
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: summary[k] for k in ("rollouts", "positions", "mean_d_bar", "max_d_bar", "share_above")}, indent=1))
    print(f"[analyze_asymmetry] wrote {path}, {html_path}, {', '.join(pngs)}, critical.md, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
