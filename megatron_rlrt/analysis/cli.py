"""Command-line pieces shared by the analysis tools: checkpoints named on the command line, where
rollouts come from, teacher views, the model-parallel layout of the scoring forward, and how a
tool turns a user's mistake into one ``error:`` line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

import torch

from megatron_rlrt.analysis import rollouts as R


def add_rollout_args(p: argparse.ArgumentParser, n_default: int = 8) -> None:
    g = p.add_argument_group("rollouts (give --rollouts, or --data to generate them)")
    g.add_argument("--rollouts", default=None,
                   help="per-problem jsonl written by tools/evaluate.py (with responses) for this checkpoint")
    g.add_argument("--data", default=None, help="problem file (jsonl/json/parquet) to generate rollouts from")
    g.add_argument("--n-samples", type=int, default=n_default, help="rollouts per problem when generating (paper: 8)")
    g.add_argument("--max-problems", type=int, default=None, help="only the first N problems")
    g.add_argument("--temperature", type=float, default=R.PAPER_TEMPERATURE, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=R.PAPER_TOP_P, help="nucleus sampling threshold")
    g.add_argument("--max-new-tokens", type=int, default=R.PAPER_MAX_NEW_TOKENS, help="longest response in tokens")
    g.add_argument("--instruction", default=None, help="text appended to every prompt when generating")
    g.add_argument("--reward", default="math", help="verifier when generating: math | reasoning_gym | auto")
    g.add_argument("--rollout-engine", default="hf", help="hf (embedded) | sglang | vllm")
    g.add_argument("--rollout-urls", nargs="*", default=[], help="running SGLang/vLLM servers")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring forward (megatron-core)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size of the scoring forward")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size of the scoring forward")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype of the scoring forward (statistics are float32 either way)")
    g.add_argument("--max-tokens-per-pack", type=int, default=8192,
                   help="token budget of one packed forward (student + teacher rows of a rollout stay together)")
    g.add_argument("--enable-thinking", action="store_true",
                   help="Qwen3 thinking mode in the chat template (must match how the rollouts were made)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_teacher_args(p: argparse.ArgumentParser) -> None:
    from megatron_rlrt.algorithms.teacher import DEFAULT_TEMPLATE

    g = p.add_argument_group("teacher view (as the trainer builds it)")
    g.add_argument("--teacher-context", default="peer", choices=["peer", "reference_solution", "reference_answer"],
                   help="privileged context c: a successful peer rollout of the same problem (the trainer's "
                        "default), the dataset's reference solution, or its answer")
    g.add_argument("--teacher-peer-choice", default="first", choices=["first", "shortest", "random"],
                   help="which successful peer becomes c")
    g.add_argument("--teacher-template", default=DEFAULT_TEMPLATE, help="teacher prompt ({prompt}, {solution})")
    g.add_argument("--teacher-max-prompt-len", type=int, default=22528, help="longest teacher prompt in tokens")


def is_writer() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def obtain_records(args, ref, out_dir: str, tokenizer) -> list[dict]:
    """Per-problem records with responses: read ``--rollouts``, or generate them from ``--data``
    into OUT_DIR/rollouts.jsonl (resumable)."""
    from megatron_rlrt.analysis.checkpoints import hf_dir_for_generation
    from megatron_rlrt.reward import get_reward

    if bool(args.rollouts) == bool(args.data):
        raise ValueError("give exactly one of --rollouts (a tools/evaluate.py results file) or --data (problems)")
    if args.rollouts:
        if not os.path.isfile(args.rollouts):
            raise FileNotFoundError(f"--rollouts {args.rollouts}: no such file")
        records = R.read_records(args.rollouts)
        if not records:
            raise R.ResultsFileError(f"--rollouts {args.rollouts}: no records")
        R.flatten(records[:1])  # clear error when written without responses
        return records[: args.max_problems] if args.max_problems else records
    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such file")
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("under torchrun give --rollouts (make them first with tools/evaluate.py); generating "
                         "needs one process -- or run the tool without torchrun, it starts its own ranks")
    sampling = R.Sampling(args.n_samples, args.temperature, args.top_p, -1, args.max_new_tokens, args.seed)
    sampling.check()
    src = R.ProblemSource(args.data, enable_thinking=args.enable_thinking, instruction=args.instruction,
                          limit=args.max_problems)
    problems = R.load_problems(src, tokenizer)
    path = os.path.join(out_dir, "rollouts.jsonl")
    done = R.read_records(path, repair=True)
    have = {r["id"] for r in done}
    rest = [p for p in problems if R.problem_id(p) not in have]
    if rest:
        engine = R.open_engine(args.rollout_engine, hf_dir_for_generation(ref, out_dir), tokenizer, args.seed,
                               args.rollout_urls, progress=args.progress)
        verifier = get_reward(args.reward)
        try:
            R.rollout_problems(engine, rest, sampling, verifier, tokenizer, R.eos_ids(engine, tokenizer),
                               on_batch=lambda recs: R.append_records(path, recs), progress=args.progress)
        finally:
            engine.shutdown()
            verifier.close()
    order = {R.problem_id(p): i for i, p in enumerate(problems)}
    return sorted((r for r in R.read_records(path) if r["id"] in order), key=lambda r: order[r["id"]])


def teacher_items(records: Sequence[dict], tokenizer, args, rows: Optional[Sequence[R.Rollout]] = None):
    """(rollouts, ScoreItems) with the trainer's teacher views (``build_teacher_views``): every
    rollout that has a context gets a teacher prompt; the others are dropped."""
    from megatron_rlrt.algorithms.teacher import TeacherConfig, build_teacher_views
    from megatron_rlrt.analysis.scoring import ScoreItem

    flat = list(rows) if rows is not None else R.flatten(records)
    sizes = {len(r["correct"]) for r in records}
    if len(sizes) != 1:
        raise ValueError(f"problems have different sample counts {sorted(sizes)}; teacher views need equal groups")
    k = sizes.pop()
    cfg = TeacherConfig(context=args.teacher_context, peer_choice=args.teacher_peer_choice,
                        template=args.teacher_template, max_teacher_prompt_len=args.teacher_max_prompt_len)
    rewards = torch.tensor([1.0 if r.correct else 0.0 for r in flat])
    views = build_teacher_views(
        "rlrt_all", tokenizer, [r.prompt for r in flat], [r.text for r in flat], rewards, k, cfg,
        bool(args.enable_thinking), zero_signal_mask=torch.zeros(len(flat), dtype=torch.bool),
        reference_solutions=[r.solution for r in flat], reference_answers=[r.answer for r in flat],
        response_lengths=[len(r.response_ids) for r in flat], generator=torch.Generator().manual_seed(args.seed))
    items = [ScoreItem(i, r.prompt_ids, r.response_ids, views.prompt_ids[i]) for i, r in enumerate(flat)]
    return flat, items, views.stats


def fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors the user can fix (bad checkpoint, data or results file, a server, a missing file, a
    bad value): reported as one ``error:`` line and exit code 2, not a traceback."""
    from megatron_rlrt.data.errors import DatasetError
    from megatron_rlrt.models.qwen3 import CheckpointError
    from megatron_rlrt.rollout.base import RolloutError

    return (CheckpointError, DatasetError, R.ResultsFileError, RolloutError, FileNotFoundError, ValueError)


def run_tool(body: Callable[[], int]) -> int:
    """A tool's ``main``: ``body()``, with ``user_errors`` as ``fail``."""
    try:
        return body()
    except user_errors() as exc:
        return fail(exc)


def split_named(values: Sequence[str], what: str) -> list[tuple[str, str]]:
    """``[NAME=]PATH`` values as (name, path); the name defaults to the file/directory name without
    its data suffix. ValueError when two share a name."""
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if sep and name and not os.path.exists(v):
            out.append((name, path))
        else:
            stem = os.path.basename(os.path.normpath(v))
            for suffix in (".jsonl.gz", ".json.gz", ".jsonl", ".ndjson", ".json", ".parquet", ".pq"):
                if stem.endswith(suffix):
                    stem = stem[: -len(suffix)]
            out.append((stem, v))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what} names {dup} are used twice; give them distinct NAME= prefixes")
    return out


def named_checkpoints(values: Sequence[str]) -> list:
    """``--checkpoint [LABEL=]PATH`` values resolved (``checkpoints.resolve``), in order."""
    from megatron_rlrt.analysis.checkpoints import resolve

    return [resolve(path, label) for label, path in split_named(values, "checkpoint")]


def require_generated(args, tool: str, what: str) -> None:
    """Tools that generate ``what`` themselves take --data, not --rollouts."""
    if args.rollouts:
        raise ValueError(f"{tool} generates {what}: give --data, not --rollouts")


def rollout_views(args, ref, out_dir: str, tokenizer):
    """The rollouts of ``ref`` (``obtain_records`` into ``out_dir``) with the trainer's teacher
    views: (records, rollouts, ScoreItems, view statistics)."""
    records = obtain_records(args, ref, out_dir, tokenizer)
    flat, items, stats = teacher_items(records, tokenizer, args)
    return records, flat, items, stats


def score_run(args, topk: int):
    """The scoring forward of ``add_model_args``' flags, keeping the ``topk`` candidates."""
    from megatron_rlrt.analysis.jobs import ScoreRun
    from megatron_rlrt.analysis.scoring import ScoreOptions

    return ScoreRun(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.dtype,
                    ScoreOptions(topk=topk, max_tokens_per_pack=args.max_tokens_per_pack), args.progress)
