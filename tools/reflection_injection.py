#!/usr/bin/env python
"""Reflection injection (paper sec. 6.2, Fig. 6): does D_bar_t mark the positions that decide the
outcome? In each rollout, "Wait, let me reconsider." replaces the token at argmax_t D_bar_t
(max_kl), at a uniform-random position (random) and at argmin_t D_bar_t (min_kl); the model
continues from there and the new response is scored. Reported per checkpoint: flip->R on the hard
subset (wrong rollouts of problems with n_correct in {0,1,2} of 8) and flip->W on the easy subset
(correct rollouts of problems with n_correct in {5,6,7}), and a plot over checkpoints.

    python tools/reflection_injection.py --checkpoint step0=Qwen3-8B \\
        --checkpoint step50=runs/rlrt/checkpoints/iter_0000050 --checkpoint step100=runs/rlrt \\
        --data dapo_100.parquet --output-dir analysis/reflection --tensor-model-parallel-size 2

D_bar_t uses the trainer's teacher view; hard problems often have no correct rollout to serve as
a peer, so the default context here is the problem's reference answer (--teacher-context).
Output (OUTPUT_DIR): <checkpoint>/rollouts.jsonl, <checkpoint>/injections.jsonl (every injected
rollout and its outcome), reflection.json, reflection.md, reflection.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POSITIONS = ("max_kl", "random", "min_kl")


def build_parser() -> argparse.ArgumentParser:
    from megatron_rlrt.analysis import cli

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", action="append", required=True, metavar="[LABEL=]PATH",
                   help="checkpoint of the run, in order (step 0 .. N); repeat for several")
    p.add_argument("--output-dir", required=True, help="where rollouts, injections, table and plot go")
    p.add_argument("--reflection", default="Wait, let me reconsider.", help="the injected text (paper's prompt)")
    p.add_argument("--hard", type=int, nargs="+", default=[0, 1, 2], help="n_correct values of the hard subset")
    p.add_argument("--easy", type=int, nargs="+", default=[5, 6, 7], help="n_correct values of the easy subset")
    p.add_argument("--continue-tokens", type=int, default=None,
                   help="new tokens after the injection (default: --max-new-tokens minus the kept prefix)")
    p.add_argument("--max-per-problem", type=int, default=None, help="inject into at most this many rollouts per problem")
    cli.add_rollout_args(p)
    cli.add_teacher_args(p)
    cli.add_model_args(p)
    p.set_defaults(teacher_context="reference_answer")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlrt.analysis import cli

    def body():
        cli.require_generated(args, "reflection_injection", "its own rollouts per checkpoint")
        return _run(args, cli.named_checkpoints(args.checkpoint))

    return cli.run_tool(body)


def injection_sites(d_bar, rng: random.Random) -> dict:
    """Positions for max_kl / random / min_kl (a position t keeps response[:t])."""
    n = len(d_bar)
    return {"max_kl": max(range(n), key=lambda t: d_bar[t]), "random": rng.randrange(n),
            "min_kl": min(range(n), key=lambda t: d_bar[t])}


def _run(args, refs) -> int:
    from megatron_rlrt.analysis import cli, plots
    from megatron_rlrt.analysis.jobs import ScoreTask, run_scoring
    from megatron_rlrt.reward import get_reward
    from megatron_rlrt.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(refs[0].tokenizer_dir)
    inject_ids = tokenizer(args.reflection, add_special_tokens=False)["input_ids"]
    plans, tasks = [], []
    for ref in refs:  # 1. rollouts and the rollouts to inject into, per checkpoint
        out = os.path.join(args.output_dir, ref.label.replace("/", "_"))
        records, flat, items, _ = cli.rollout_views(args, ref, out, tokenizer)
        n_correct = [records[r.problem]["n_correct"] for r in flat]
        per_problem: dict = {}
        chosen = []
        for it, r, c in zip(items, flat, n_correct):
            subset = "hard" if c in args.hard and not r.correct else "easy" if c in args.easy and r.correct else None
            if subset is None or it.teacher_prompt_ids is None or len(r.response_ids) < 2:
                continue
            if args.max_per_problem and per_problem.get(r.problem, 0) >= args.max_per_problem:
                continue
            per_problem[r.problem] = per_problem.get(r.problem, 0) + 1
            chosen.append((it, r, subset))
        plans.append((ref, out, records, chosen))
        tasks.append(ScoreTask("views", ref, [it for it, _, _ in chosen]))
    run = cli.score_run(args, topk=1)
    scored = run_scoring([t for t in tasks if t.items], run) if any(t.items for t in tasks) else []
    if not cli.is_writer():
        return 0
    scored_iter = iter(scored)
    results = {}
    verifier = get_reward(args.reward)
    try:
        for (ref, out, records, chosen), task in zip(plans, tasks):  # 2. inject and continue
            scores = next(scored_iter) if task.items else {}
            rng = random.Random(args.seed)
            jobs = []
            for it, r, subset in chosen:
                sites = injection_sites(scores[it.key].kl.tolist(), rng)
                for pos in POSITIONS:
                    t = sites[pos]
                    jobs.append({"problem": r.problem, "sample": r.sample, "subset": subset, "position": pos, "t": t,
                                 "d_bar": float(scores[it.key].kl[t]), "prefix": list(r.response_ids[:t]) + inject_ids,
                                 "prompt_ids": r.prompt_ids, "record": records[r.problem]})
            outcomes, texts = _continue(args, ref, out, tokenizer, jobs, verifier) if jobs else ([], [])
            with open(os.path.join(out, "injections.jsonl"), "w", encoding="utf-8") as f:
                for j, ok, text in zip(jobs, outcomes, texts):
                    f.write(json.dumps({k: j[k] for k in ("problem", "sample", "subset", "position", "t", "d_bar")}
                                       | {"id": j["record"]["id"], "correct_after": ok, "response_after": text},
                                       ensure_ascii=False) + "\n")
            res = {}
            for subset, key, flip in (("hard", "flip_to_R", True), ("easy", "flip_to_W", False)):
                for pos in POSITIONS:
                    hits = [ok == flip for j, ok in zip(jobs, outcomes) if j["subset"] == subset and j["position"] == pos]
                    res.setdefault(key, {})[pos] = {"rate": sum(hits) / len(hits) if hits else None, "n": len(hits)}
            results[ref.label] = res
    finally:
        verifier.close()
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "reflection.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    lines = ["| checkpoint | " + " | ".join(f"flip->R {p}" for p in POSITIONS) + " | "
             + " | ".join(f"flip->W {p}" for p in POSITIONS) + " |", "|---" * 7 + "|"]
    fmt = lambda x: "-" if x["rate"] is None else f"{100 * x['rate']:.1f}% (n={x['n']})"
    for label, res in results.items():
        lines.append(f"| {label} | " + " | ".join(fmt(res["flip_to_R"][p]) for p in POSITIONS) + " | "
                     + " | ".join(fmt(res["flip_to_W"][p]) for p in POSITIONS) + " |")
    with open(os.path.join(args.output_dir, "reflection.md"), "w", encoding="utf-8") as f:
        f.write(f"Reflection {args.reflection!r} injected at max_kl / random / min_kl; flip->R on hard "
                f"(n_correct in {args.hard}), flip->W on easy (n_correct in {args.easy})\n\n" + "\n".join(lines) + "\n")
    rates = {key: {p: [results[l][key][p]["rate"] for l in results] for p in POSITIONS} for key in ("flip_to_R", "flip_to_W")}
    png = plots.reflection_flips(list(results), rates, os.path.join(args.output_dir, "reflection.png"))
    print("\n".join(lines))
    print(f"[reflection_injection] wrote reflection.md, reflection.json, {png}")
    return 0


def _continue(args, ref, out, tokenizer, jobs, verifier) -> tuple[list[bool], list[str]]:
    """Continue every injected prefix once; (verdicts, texts) of prefix + continuation."""
    from megatron_rlrt.analysis import rollouts as R
    from megatron_rlrt.analysis.checkpoints import hf_dir_for_generation

    engine = R.open_engine(args.rollout_engine, hf_dir_for_generation(ref, out), tokenizer, args.seed,
                           args.rollout_urls, progress=args.progress)
    try:
        stop = R.eos_ids(engine, tokenizer)
        sampling = R.Sampling(1, args.temperature, args.top_p, -1, args.max_new_tokens, args.seed)
        texts = []
        by_budget: dict = {}
        for i, j in enumerate(jobs):  # one generate call per continuation budget
            budget = args.continue_tokens or max(1, args.max_new_tokens - len(j["prefix"]))
            by_budget.setdefault(budget, []).append(i)
        conts = [None] * len(jobs)
        for budget, idx in by_budget.items():
            groups = R.generate(engine, [list(jobs[i]["prompt_ids"]) + jobs[i]["prefix"] for i in idx], 1, sampling, stop,
                                args.seed + 1, max_new_tokens=budget)
            for i, g in zip(idx, groups):
                conts[i] = g[0].response_ids
        texts = [tokenizer.decode(j["prefix"] + c, skip_special_tokens=True) for j, c in zip(jobs, conts)]
        samples = [_sample_of(j["record"]) for j in jobs]
        return [r.correct for r in verifier.score(texts, samples).results], texts
    finally:
        engine.shutdown()


def _sample_of(record):
    """What a verifier reads from a problem: answer (+ metadata for reasoning-gym rows)."""
    from types import SimpleNamespace

    return SimpleNamespace(answer=record["answer"], metadata=record.get("metadata") or {},
                           verifier=record.get("verifier"), solution=record.get("solution"))


if __name__ == "__main__":
    sys.exit(main())
