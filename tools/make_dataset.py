#!/usr/bin/env python
"""Write offline prompt datasets (jsonl, our ``rlrt`` layout) and check dataset files.

    python tools/make_dataset.py reasoning-gym --task chain_sum --size 2000 --seed 1 \
        --config '{"min_terms": 2, "max_terms": 3}' --out data/chain_sum.jsonl \
        --eval-size 200 --eval-out data/chain_sum_eval.jsonl
    python tools/make_dataset.py champ --out data/champ.jsonl
    python tools/make_dataset.py aime --source evals-3.0.1.post1-py3-none-any.whl --out data/aime.jsonl
    python tools/make_dataset.py check dapo-math-17k.parquet --max-prompt-length 1024
    python tools/make_dataset.py list-tasks
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlrt.data import generators as gen  # noqa: E402

RG_INSTRUCTION = (
    "Think step by step, then give only the final answer inside <answer></answer> tags, "
    "e.g. <answer>42</answer>."
)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"min_terms\": 2}'")
    return value


def cmd_reasoning_gym(args: argparse.Namespace) -> None:
    instruction = None if args.no_instruction else args.instruction
    rows = list(gen.reasoning_gym_rows(args.task, args.size, args.seed, args.config, instruction))
    n = gen.write_jsonl(rows, args.out)
    print(f"wrote {n} {args.task} rows to {args.out}")
    if args.eval_size:
        if not args.eval_out:
            raise SystemExit("--eval-size needs --eval-out")
        seen = {r["prompt"] for r in rows}
        eval_rows = gen.reasoning_gym_rows(args.task, args.eval_size, args.eval_seed, args.config, instruction)
        kept = [r for r in eval_rows if r["prompt"] not in seen]
        n = gen.write_jsonl(kept, args.eval_out)
        print(f"wrote {n} held-out rows to {args.eval_out} ({args.eval_size - n} dropped: same question as a training row)")


def cmd_champ(args: argparse.Namespace) -> None:
    n = gen.write_jsonl(gen.champ_rows(args.source, args.answers, args.instruction), args.out)
    print(f"wrote {n} champ rows (answers: {args.answers}) to {args.out}")


def _download_evals(directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    wheel = os.path.join(directory, "evals-3.0.1.post1-py3-none-any.whl")
    if not os.path.exists(wheel):
        print(f"downloading {gen.EVALS_PIN} (46 MB wheel, not installed) into {directory}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", gen.EVALS_PIN, "-d", directory], check=True
        )
    return wheel


def cmd_aime(args: argparse.Namespace) -> None:
    source = args.source or _download_evals(args.download_dir)
    rows = gen.aime_rows(source, keep_system=not args.no_system, instruction=args.instruction)
    n = gen.write_jsonl(rows, args.out)
    print(f"wrote {n} AIME rows to {args.out}")


def cmd_check(args: argparse.Namespace) -> None:
    from megatron_rlrt.data import DataConfig, PromptDataset, TemplateConfig
    from megatron_rlrt.data.readers import file_format

    for path in args.paths:  # fail on a wrong name before spending seconds on the tokenizer
        file_format(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"dataset file not found: {path}")
    from megatron_rlrt.tokenizer import load_tokenizer

    template = TemplateConfig(
        enable_thinking=args.enable_thinking, system_prompt=args.system_prompt, instruction=args.instruction
    )
    config = DataConfig(
        path=args.paths,
        layout=args.layout,
        prompt_key=args.prompt_key,
        answer_key=args.answer_key,
        solution_key=args.solution_key,
        max_prompt_length=args.max_prompt_length,
        template=template,
    )
    ds = PromptDataset.from_config(config, load_tokenizer(args.tokenizer))
    lengths = sorted(len(s.prompt_ids) for s in ds)
    print(ds.stats.summary())
    print(f"prompt tokens: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    s = ds[0]
    print(f"first sample ({s.source}): answer={s.answer!r} verifier={s.verifier} solution={'yes' if s.solution else 'no'}")
    print(s.prompt_text)


def cmd_list_tasks(args: argparse.Namespace) -> None:
    from reasoning_gym.factory import DATASETS

    print("\n".join(sorted(DATASETS)))


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rg = sub.add_parser("reasoning-gym", help="rows of a reasoning-gym task", formatter_class=fmt)
    rg.add_argument("--task", required=True, help="reasoning-gym task name (see list-tasks), e.g. chain_sum, basic_arithmetic, countdown")
    rg.add_argument("--size", type=int, required=True, help="number of rows")
    rg.add_argument("--seed", type=int, default=1, help="generator seed")
    rg.add_argument("--config", type=_json_object, default={},
                    help="task config / difficulty kwargs as a JSON object, e.g. '{\"min_terms\": 2, \"max_digits\": 2}'")
    rg.add_argument("--instruction", default=RG_INSTRUCTION, help="text appended to every question")
    rg.add_argument("--no-instruction", action="store_true", help="write the bare questions")
    rg.add_argument("--out", required=True, help="output .jsonl path")
    rg.add_argument("--eval-size", type=int, default=0, help="also write this many held-out rows (questions seen in training dropped)")
    rg.add_argument("--eval-seed", type=int, default=1_000_003, help="generator seed of the held-out rows")
    rg.add_argument("--eval-out", default=None, help="held-out .jsonl path (with --eval-size)")
    rg.set_defaults(func=cmd_reasoning_gym)

    ch = sub.add_parser("champ", help="champ-dataset problems with step-by-step reference solutions", formatter_class=fmt)
    ch.add_argument("--source", default=None, help="champ v0.json or a champ_dataset wheel; default: the installed champ-dataset")
    ch.add_argument("--answers", choices=gen.ANSWER_FILTERS, default="no_text",
                    help="keep all problems, those whose answer has no English words (math-verify can compare it), or numeric answers only")
    ch.add_argument("--instruction", default=None, help="text appended to every problem")
    ch.add_argument("--out", required=True, help="output .jsonl path")
    ch.set_defaults(func=cmd_champ)

    ai = sub.add_parser("aime", help="AIME problems from OpenAI evals' aime_evaluation samples", formatter_class=fmt)
    ai.add_argument("--source", default=None, help="the evals wheel or its samples.jsonl; default: pip download the wheel")
    ai.add_argument("--download-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "megatron_rlrt"),
                    help="where the evals wheel is downloaded when --source is not given")
    ai.add_argument("--no-system", action="store_true", help="drop the samples' system message ('three digits' format note)")
    ai.add_argument("--instruction", default=None, help="text appended to the user message")
    ai.add_argument("--out", required=True, help="output .jsonl path")
    ai.set_defaults(func=cmd_aime)

    ck = sub.add_parser("check", help="load dataset files as the trainer would and print counts", formatter_class=fmt)
    ck.add_argument("paths", nargs="+", help=".jsonl/.jsonl.gz/.json/.parquet files")
    ck.add_argument("--layout", default="auto", help="auto, dapo, math, gsm8k or rlrt")
    ck.add_argument("--prompt-key", default=None, help="prompt column (dotted path for nested fields)")
    ck.add_argument("--answer-key", default=None, help="gold answer column, e.g. reward_model.ground_truth")
    ck.add_argument("--solution-key", default=None, help="reference solution column")
    ck.add_argument("--max-prompt-length", type=int, default=None, help="skip (and count) longer prompts")
    think = ck.add_mutually_exclusive_group()
    think.add_argument("--enable-thinking", dest="enable_thinking", action="store_true", default=None,
                       help="render with Qwen3 thinking on")
    think.add_argument("--disable-thinking", dest="enable_thinking", action="store_false",
                       help="render with Qwen3 thinking off (empty think block in the prompt)")
    ck.add_argument("--system-prompt", default=None, help="system message for prompts without one")
    ck.add_argument("--instruction", default=None, help="text appended to the last user message")
    ck.add_argument("--tokenizer", default=None, help="tokenizer/checkpoint dir; default: the real Qwen3 tokenizer")
    ck.set_defaults(func=cmd_check)

    lt = sub.add_parser("list-tasks", help="print reasoning-gym task names", formatter_class=fmt)
    lt.set_defaults(func=cmd_list_tasks)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:  # bad input: one clear line, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
