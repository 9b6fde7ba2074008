#!/usr/bin/env python
"""Turn an RLT teacher's explanations into an SFT dataset (the RLT paper's use of its teachers).

For every problem (question + reference solution) the teacher -- a model trained with
``--advantage-estimator rlt``, or any model -- gets the RLT teacher prompt (the authors' system
prompt, the question, and an assistant turn pre-filled with the solution and the opening
explanation tag; megatron_rlrt.algorithms.rlt) and writes an explanation. Each explanation
becomes one SFT row in which the student "thinks" the explanation and then answers with the
solution, with no filtering or post-processing, as in the paper:

    {"id", "prompt", "answer", "solution", "explanation", "explanation_closed",
     "messages": [{"role": "user", "content": question},
                  {"role": "assistant", "content": "<think>\\n" + explanation + "\\n</think>\\n\\n" + solution}]}

Defaults are the authors' (SakanaAI/RLT cfgs/run_cfg/teacher_rlt.yaml): temperature 0.7, up
to 16,384 new tokens. Explanations that never reach ``<|end_of_explanation|>`` (cut by the token
limit) are dropped unless --keep-unclosed. Rerunning with the same --output resumes: problems
listed in OUTPUT.done (written after each batch) or already in OUTPUT are skipped.

    python tools/rlt_distill_data.py --teacher runs/rlt-teacher --data math.jsonl --output sft.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--teacher", required=True, help="the teacher: HF directory or megatron-rlrt checkpoint/run dir")
    p.add_argument("--data", required=True, help="problems with reference solutions (jsonl/json/parquet)")
    p.add_argument("--output", required=True, help="SFT jsonl to write (appended to / resumed if it exists)")
    p.add_argument("--layout", default="auto", help="dataset layout: auto | dapo | math | gsm8k | rlrt")
    p.add_argument("--prompt-key", default=None, help="column with the question (overrides the layout)")
    p.add_argument("--answer-key", default=None, help="column with the gold answer (overrides the layout)")
    p.add_argument("--solution-key", default=None, help="column with the reference solution (overrides the layout)")
    p.add_argument("--n-samples", type=int, default=1, help="explanations per problem (one SFT row each)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (RLT authors: 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--max-new-tokens", type=int, default=16384,
                   help="longest explanation in tokens (RLT authors' max_completion_length: 16384)")
    p.add_argument("--keep-unclosed", action="store_true",
                   help="also keep explanations that never closed with <|end_of_explanation|> (cut by the limit)")
    p.add_argument("--max-problems", type=int, default=None, help="only the first N problems")
    p.add_argument("--rollout-engine", default="hf", help="hf (embedded transformers) | sglang | vllm")
    p.add_argument("--rollout-urls", nargs="*", default=[], help="running SGLang/vLLM servers (with sglang/vllm)")
    p.add_argument("--batch-problems", type=int, default=8, help="problems per generate call (the resume granularity)")
    p.add_argument("--engine-batch-size", type=int, default=64, help="sequences per forward in the embedded engine")
    p.add_argument("--bf16", action="store_true", help="embedded engine in bfloat16 (default float32)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def question_of(problem) -> str:
    """The question as the file has it: the prompt text, or the last user turn of chat messages
    (the same question the trainer's ``rlt`` method puts in the teacher prompt)."""
    from megatron_rlrt.algorithms.rlt import rlt_question

    return rlt_question(problem)


def sft_row(problem, explanation: str, closed: bool, think=None) -> dict:
    from megatron_rlrt.algorithms.rlt import RLT_STUDENT_THINK
    from megatron_rlrt.analysis.rollouts import problem_id

    think = think or RLT_STUDENT_THINK
    question = question_of(problem)
    return {"id": problem_id(problem), "prompt": question, "answer": problem.answer, "solution": problem.solution,
            "explanation": explanation, "explanation_closed": closed,
            "messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": think[0] + explanation + think[1] + problem.solution}]}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlrt.analysis import checkpoints as C
    from megatron_rlrt.analysis import cli
    from megatron_rlrt.analysis import rollouts as R

    def body():
        R.Sampling(args.n_samples, args.temperature, args.top_p, -1, args.max_new_tokens, args.seed).check()
        if not os.path.isfile(args.data):
            raise FileNotFoundError(f"--data {args.data}: no such file")
        return _run(args, C.resolve(args.teacher))

    return cli.run_tool(body)


def _run(args, ref) -> int:
    from megatron_rlrt.algorithms.rlt import render_rlt_teacher_prompt, split_explanation
    from megatron_rlrt.analysis import checkpoints as C
    from megatron_rlrt.analysis import rollouts as R
    from megatron_rlrt.data.errors import DatasetError
    from megatron_rlrt.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ref.tokenizer_dir)
    src = R.ProblemSource(args.data, args.layout, args.prompt_key, args.answer_key, args.solution_key,
                          apply_chat_template=False, limit=args.max_problems)
    problems = R.load_problems(src, tokenizer)
    missing = [p.source for p in problems if not p.solution]
    if missing:
        row = missing[0].rpartition(":")[2]
        raise DatasetError(args.data, int(row) if row.isdigit() else None,
                           f"no reference solution ({len(missing)} problems without one); RLT teachers explain a "
                           "given solution: use a layout that has one (math, rlrt) or --solution-key")
    progress_path = args.output + ".done"
    done = _ids(args.output) | _ids(progress_path)
    todo = [p for p in problems if R.problem_id(p) not in done]
    if done:
        print(f"[rlt_distill_data] resuming: {len(problems) - len(todo)} of {len(problems)} problems done")
    sampling = R.Sampling(args.n_samples, args.temperature, args.top_p, -1, args.max_new_tokens, args.seed)
    kept = dropped = 0
    if todo:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        engine = R.open_engine(args.rollout_engine, C.hf_dir_for_generation(ref, out_dir), tokenizer, args.seed,
                               args.rollout_urls, args.engine_batch_size, args.progress, args.bf16)
        try:
            stop = R.eos_ids(engine, tokenizer)
            for start in range(0, len(todo), args.batch_problems):
                chunk = todo[start: start + args.batch_problems]
                prompts = [render_rlt_teacher_prompt(tokenizer, question_of(p), p.solution) for p in chunk]
                outs = R.generate(engine, prompts, args.n_samples, sampling, stop, args.seed + start)
                rows = []
                for problem, samples in zip(chunk, outs):
                    for s in samples:
                        ids, closed = split_explanation(tokenizer, s.response_ids)
                        if not closed and not args.keep_unclosed:
                            dropped += 1
                            continue
                        rows.append(sft_row(problem, tokenizer.decode(ids, skip_special_tokens=False), closed))
                kept += len(rows)
                R.append_records(args.output, rows)  # SFT rows first, then the problems as done
                R.append_records(progress_path, [{"id": R.problem_id(p)} for p in chunk])
        finally:
            engine.shutdown()
    print(f"[rlt_distill_data] wrote {kept} SFT rows to {args.output}; dropped {dropped} unclosed explanations "
          f"(--keep-unclosed keeps them)")
    return 0


def _ids(path: str) -> set:
    """Problem ids in a jsonl file; a torn last line (interrupted write) is ignored."""
    if not os.path.exists(path):
        return set()
    ids = set()
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError):
            if i == len(lines):  # no newline after it: an interrupted write, cut it off
                with open(path, "r+b") as f:
                    f.truncate(len("\n".join(lines[:-1]).encode("utf-8")) + 1)
                continue
            raise ValueError(f"{path}:{i}: not a JSON row with an 'id'; move the file away to start over") from None
    return ids


if __name__ == "__main__":
    sys.exit(main())
