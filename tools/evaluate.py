#!/usr/bin/env python
"""Evaluate checkpoints on benchmark files: avg@n and unbiased pass@k (k = 1..n), per-problem
results, a summary table (markdown + json) and a pass@k curve PNG with every checkpoint.

Defaults are the paper's evaluation protocol: n = 16 samples per problem (avg@16 / pass@16;
--n-samples 256 gives the Fig. 8 curves), temperature 1.0, top-p 1.0, up to 20,480 new tokens,
thinking off. Scoring uses the trainer's verifiers (math-verify in the scoring process pool by
default; --reward auto routes rows by their 'verifier' column, e.g. reasoning-gym data).

    python tools/evaluate.py --checkpoint Qwen3-8B --checkpoint runs/rlrt-8b \\
        --data aime24=data/aime24.parquet --data math500=data/math500.jsonl --output-dir evals/rlrt

Benchmark files: jsonl / json / parquet in the layouts of megatron_rlrt.data.layouts -- DAPO-Math
(prompt + reward_model.ground_truth), MATH-500 / AIME 24 / AMC (problem + answer/solution),
AIME 25 (question + answer), and the project's own files (tools/make_dataset.py). A checkpoint is
a Hugging Face directory or a megatron-rlrt checkpoint / run directory (exported to HF once for
the rollout engine). Output: OUTPUT_DIR/<checkpoint>/<benchmark>.jsonl (one line per problem),
summary.md, summary.json, passk.png. Rerunning with the same OUTPUT_DIR resumes: problems already
in a results file are not generated again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from megatron_rlrt.analysis import rollouts as R

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", action="append", required=True, metavar="[LABEL=]PATH",
                   help="HF directory or megatron-rlrt checkpoint/run dir; repeat for several (one curve each)")
    p.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                   help="benchmark file (jsonl/json/parquet); repeat for several; NAME defaults to the file stem")
    p.add_argument("--output-dir", required=True, help="where results, summary and plot go (reused to resume)")
    p.add_argument("--n-samples", type=int, default=R.PAPER_N_SAMPLES,
                   help="samples per problem n; avg@n and pass@k for k = 1..n are reported (paper: 16; Fig. 8: 256)")
    p.add_argument("--temperature", type=float, default=R.PAPER_TEMPERATURE, help="sampling temperature (paper: 1.0)")
    p.add_argument("--top-p", type=float, default=R.PAPER_TOP_P, help="nucleus sampling threshold (paper: 1.0)")
    p.add_argument("--top-k", type=int, default=-1, help="top-k sampling (-1: off)")
    p.add_argument("--max-new-tokens", type=int, default=R.PAPER_MAX_NEW_TOKENS,
                   help="longest response in tokens (paper: 20480)")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--enable-thinking", dest="enable_thinking", action="store_true", default=False,
                       help="Qwen3 thinking mode on in the chat template")
    think.add_argument("--no-enable-thinking", dest="enable_thinking", action="store_false",
                       help="thinking off (default; the paper's Qwen3-8B setting)")
    p.add_argument("--instruction", default=None,
                   help=f"text appended to every prompt (none by default; math benchmarks usually use {R.PAPER_INSTRUCTION!r})")
    p.add_argument("--system-prompt", default=None, help="system message for prompts that have none")
    p.add_argument("--layout", default="auto", help="dataset layout: auto | dapo | math | gsm8k | rlrt")
    p.add_argument("--prompt-key", default=None, help="column with the prompt (overrides the layout)")
    p.add_argument("--answer-key", default=None, help="column with the gold answer (overrides the layout)")
    p.add_argument("--max-problems", type=int, default=None, help="only the first N problems of each file")
    p.add_argument("--reward", default="math", help="verifier: math (math-verify) | reasoning_gym | auto (per row)")
    p.add_argument("--reward-timeout", type=float, default=10.0, help="seconds per answer before scoring is killed")
    p.add_argument("--reward-workers", type=int, default=None, help="scoring processes (default: CPU count)")
    p.add_argument("--rollout-engine", default="hf", help="hf (embedded transformers) | sglang | vllm")
    p.add_argument("--rollout-urls", nargs="*", default=[], help="running SGLang/vLLM servers (with sglang/vllm)")
    p.add_argument("--batch-problems", type=int, default=8,
                   help="problems per generate call; results are saved after each (the resume granularity)")
    p.add_argument("--engine-batch-size", type=int, default=64, help="sequences per forward in the embedded engine")
    p.add_argument("--bf16", action="store_true", help="embedded engine in bfloat16 (default float32)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-save-responses", dest="save_responses", action="store_false",
                   help="keep only scores per problem, not response texts and token ids (the analysis tools need them)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


SETTINGS_KEYS = ("n_samples", "temperature", "top_p", "top_k", "max_new_tokens", "enable_thinking", "instruction",
                 "system_prompt", "seed", "reward")


def _check_settings(out_dir: str, args) -> None:
    path = os.path.join(out_dir, "settings.json")
    mine = {k: getattr(args, k) for k in SETTINGS_KEYS}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            theirs = json.load(f)
        diff = {k: (theirs.get(k), mine[k]) for k in SETTINGS_KEYS if theirs.get(k) != mine[k]}
        if diff:
            raise ValueError(f"{path}: this output dir was evaluated with other settings {diff} (saved, now); use "
                             "the same settings to resume or another --output-dir")
    else:
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(mine, f, indent=2)


def summarize(records: list[dict], n: int) -> dict:
    from megatron_rlrt.analysis.stats import curve_ks, pass_at_k_curve

    counts = [r["n_correct"] for r in records]
    curve = pass_at_k_curve(counts, n, curve_ks(n))
    lengths = [x for r in records for x in r["response_lengths"]]
    truncated = [f == "length" for r in records for f in r["finish_reasons"]]
    return {"problems": len(records), "n": n, f"avg@{n}": sum(counts) / (n * len(records)),
            "pass@k": {str(k): v for k, v in curve.items()},
            "mean_response_tokens": sum(lengths) / max(1, len(lengths)),
            "truncated_frac": sum(truncated) / max(1, len(truncated))}


def write_summary(out_dir: str, table: dict, n: int) -> tuple[str, str, str]:
    from megatron_rlrt.analysis import plots

    shown = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= n} | {n})
    lines = ["| benchmark | checkpoint | problems | " + f"avg@{n} | " + " | ".join(f"pass@{k}" for k in shown)
             + " | mean tokens | truncated |",
             "|" + "---|" * (5 + len(shown) + 1)]
    for bench, per_ckpt in table.items():
        for label, s in per_ckpt.items():
            lines.append(f"| {bench} | {label} | {s['problems']} | {100 * s[f'avg@{n}']:.1f} | "
                         + " | ".join(f"{100 * s['pass@k'][str(k)]:.1f}" for k in shown)
                         + f" | {s['mean_response_tokens']:.0f} | {100 * s['truncated_frac']:.1f}% |")
    md = os.path.join(out_dir, "summary.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(f"Accuracy in % (n = {n} samples per problem; pass@k: Chen et al.'s unbiased estimator)\n\n")
        f.write("\n".join(lines) + "\n")
    js = os.path.join(out_dir, "summary.json")
    with open(js, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=2)
    curves = {b: {lab: {int(k): v for k, v in s["pass@k"].items()} for lab, s in per.items()} for b, per in table.items()}
    png = plots.passk_curves(curves, os.path.join(out_dir, "passk.png"), title=f"pass@k, n = {n}")
    return md, js, png


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlrt.analysis import cli
    from megatron_rlrt.analysis import rollouts as R

    def body():
        R.Sampling(args.n_samples, args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.seed).check()
        refs = cli.named_checkpoints(args.checkpoint)
        benches = cli.split_named(args.data, "benchmark")
        for _, path in benches:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--data {path}: no such file")
        _check_settings(args.output_dir, args)
        return _run(args, refs, benches)

    return cli.run_tool(body)


def _run(args, refs, benches) -> int:
    from megatron_rlrt.analysis import checkpoints as C
    from megatron_rlrt.analysis import rollouts as R
    from megatron_rlrt.reward import get_reward
    from megatron_rlrt.tokenizer import load_tokenizer

    sampling = R.Sampling(args.n_samples, args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.seed)
    tokenizer = load_tokenizer(refs[0].tokenizer_dir)
    problems = {}
    for name, path in benches:
        src = R.ProblemSource(path, args.layout, args.prompt_key, args.answer_key, verifier=None,
                              enable_thinking=args.enable_thinking, instruction=args.instruction,
                              system_prompt=args.system_prompt, limit=args.max_problems)
        problems[name] = R.load_problems(src, tokenizer)
    engine = verifier = None
    table: dict = {name: {} for name, _ in benches}
    try:
        for version, ref in enumerate(refs, 1):
            todo = {}
            for name, _ in benches:
                path = os.path.join(args.output_dir, ref.label.replace("/", "_"), f"{name}.jsonl")
                done = R.read_records(path, repair=True)
                for rec in done:
                    if rec.get("n") != args.n_samples:
                        raise R.ResultsFileError(f"{path}: problem {rec['id']} has n={rec.get('n')}, this run "
                                                 f"--n-samples {args.n_samples}")
                have = {rec["id"] for rec in done}
                todo[name] = (path, [p for p in problems[name] if R.problem_id(p) not in have])
                if have:
                    print(f"[evaluate] {ref.label} / {name}: resuming, {len(have)} of {len(problems[name])} problems done")
            if any(rest for _, rest in todo.values()):
                hf_dir = C.hf_dir_for_generation(ref, args.output_dir)
                if engine is None:
                    engine = R.open_engine(args.rollout_engine, hf_dir, tokenizer, args.seed, args.rollout_urls,
                                           args.engine_batch_size, args.progress, args.bf16)
                    if args.rollout_urls:
                        R.push_weights(engine, hf_dir, version)
                else:
                    R.push_weights(engine, hf_dir, version)
                if verifier is None:
                    verifier = get_reward(args.reward, timeout_s=args.reward_timeout, num_workers=args.reward_workers)
                stop = R.eos_ids(engine, tokenizer)
                for name, (path, rest) in todo.items():
                    if rest:
                        print(f"[evaluate] {ref.label} / {name}: {len(rest)} problems x {args.n_samples} samples")
                        R.rollout_problems(engine, rest, sampling, verifier, tokenizer, stop, args.batch_problems,
                                           args.save_responses, on_batch=lambda recs, p=path: R.append_records(p, recs),
                                           progress=args.progress)
            for name, (path, _) in todo.items():
                records = R.read_records(path)
                order = {R.problem_id(p): i for i, p in enumerate(problems[name])}
                records = [r for r in records if r["id"] in order]
                table[name][ref.label] = summarize(records, args.n_samples)
    finally:
        if engine is not None:
            engine.shutdown()
        if verifier is not None:
            verifier.close()
    md, js, png = write_summary(args.output_dir, table, args.n_samples)
    with open(md, encoding="utf-8") as f:
        print(f.read())
    print(f"[evaluate] wrote {md}, {js}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
