"""Problems -> K sampled responses each -> verifier scores -> one jsonl record per problem.

Used by tools/evaluate.py and by every analysis tool that needs rollouts. Problems are read with
the trainer's dataset code (``megatron_rlrt.data``: jsonl/json/parquet; dapo, math (MATH-500,
AIME 24, AMC), gsm8k-style ``question``/``answer`` (AIME 25), rlrt layouts), rendered with the
same chat template; responses come from any rollout engine of ``megatron_rlrt.rollout``; the
verifiers are the trainer's (math-verify in the scoring pool, reasoning-gym, auto by row).

A results file is append-only, one complete problem per line, flushed and fsynced per batch, so
an interrupted run loses at most the batch in flight and a rerun continues after the last
complete line (a torn final line is dropped with a warning).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Optional, Sequence

logger = logging.getLogger(__name__)

# The paper's evaluation protocol (sec. 6.1, App. G: avg@16 / pass@16 at the rollout temperature
# 1.0, top-p 1.0, responses up to 20,480 tokens; Qwen3-8B is evaluated with thinking off).
PAPER_N_SAMPLES = 16
PAPER_TEMPERATURE = 1.0
PAPER_TOP_P = 1.0
PAPER_MAX_NEW_TOKENS = 20480
PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Sampling:
    n: int = PAPER_N_SAMPLES
    temperature: float = PAPER_TEMPERATURE
    top_p: float = PAPER_TOP_P
    top_k: int = -1
    max_new_tokens: int = PAPER_MAX_NEW_TOKENS
    seed: int = 0

    def check(self) -> None:
        if self.n < 1:
            raise ValueError(f"--n-samples must be >= 1, got {self.n}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class ProblemSource:
    path: str
    layout: str = "auto"
    prompt_key: Optional[str] = None
    answer_key: Optional[str] = None
    solution_key: Optional[str] = None
    verifier: Optional[str] = None
    enable_thinking: Optional[bool] = False
    instruction: Optional[str] = None
    system_prompt: Optional[str] = None
    apply_chat_template: bool = True
    max_prompt_length: Optional[int] = None
    limit: Optional[int] = None


def load_problems(src: ProblemSource, tokenizer) -> list:
    """PromptSamples of the file (DatasetError naming file/row for bad input)."""
    from megatron_rlrt.data import DataConfig, PromptDataset, TemplateConfig

    template = TemplateConfig(apply_chat_template=src.apply_chat_template, enable_thinking=src.enable_thinking,
                              system_prompt=src.system_prompt, instruction=src.instruction)
    cfg = DataConfig(path=src.path, layout=src.layout, prompt_key=src.prompt_key, answer_key=src.answer_key,
                     solution_key=src.solution_key, verifier=src.verifier, max_prompt_length=src.max_prompt_length,
                     template=template)
    problems = list(PromptDataset.from_config(cfg, tokenizer))
    return problems[: src.limit] if src.limit else problems


def open_engine(name: str, hf_dir: str, tokenizer, seed: int = 0, rollout_urls: Sequence[str] = (),
                batch_size: int = 64, progress: bool = True, bf16: bool = False):
    """A rollout engine by name (``megatron_rlrt.rollout.registry``): hf | sglang | vllm."""
    from megatron_rlrt.rollout.registry import create_engine

    cfg = SimpleNamespace(rollout_engine=name, bf16=bf16, rollout_batch_size_per_forward=batch_size, seed=seed,
                          progress=progress, rollout_urls=list(rollout_urls) or None, colocate=False,
                          rollout_num_gpus_per_engine=1, update_weight_buffer_size=512 * 1024**2)
    return create_engine(cfg, hf_dir, tokenizer)


def push_weights(engine, hf_dir: str, version: int) -> None:
    """Load a HF checkpoint's tensors into a running engine (several checkpoints, one engine)."""
    from megatron_rlrt.models.hf_checkpoint import load_hf_weights
    from megatron_rlrt.models.qwen3 import Qwen3Spec
    from megatron_rlrt.rollout.base import iter_weight_buckets

    weights = load_hf_weights(hf_dir, Qwen3Spec.from_hf_dir(hf_dir))
    engine.update_weights(iter_weight_buckets((k, weights[k]) for k in weights), version)


def eos_ids(engine, tokenizer) -> tuple[int, ...]:
    ids = list(getattr(engine, "eos_token_ids", ()) or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return tuple(ids)


def generate(engine, prompt_ids: Sequence[Sequence[int]], n: int, sampling: Sampling, stop_ids, seed: int,
             max_new_tokens: Optional[int] = None):
    from megatron_rlrt.rollout.base import RolloutError, SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens or sampling.max_new_tokens, temperature=sampling.temperature,
                            top_p=sampling.top_p, top_k=sampling.top_k, stop_token_ids=tuple(stop_ids), seed=seed)
    out = engine.generate([list(p) for p in prompt_ids], n, params)
    if len(out) != len(prompt_ids) or any(len(g) != n for g in out):
        raise RolloutError(f"engine returned {[len(g) for g in out]} samples for {len(prompt_ids)} prompts x {n}")
    return out


def problem_id(problem) -> str:
    """``file name:row`` -- stable however the file's directory is spelled on a rerun."""
    path, _, row = problem.source.rpartition(":")
    return f"{os.path.basename(path)}:{row}"


def problem_record(problem, samples, scored, tokenizer, keep_responses: bool) -> dict:
    rec = {
        "id": problem_id(problem),
        "prompt": problem.prompt,
        "answer": problem.answer,
        "n": len(samples),
        "n_correct": int(sum(r.correct for r in scored)),
        "correct": [bool(r.correct) for r in scored],
        "reasons": [r.reason for r in scored],
        "response_lengths": [len(s.response_ids) for s in samples],
        "finish_reasons": [s.finish_reason for s in samples],
    }
    if problem.solution:
        rec["solution"] = problem.solution
    rec["messages"] = problem.messages  # the prompt as rendered (instruction / system prompt applied)
    if problem.verifier:
        rec["verifier"] = problem.verifier
    if problem.metadata:
        rec["metadata"] = problem.metadata  # what some verifiers read (reasoning-gym's entry)
    if keep_responses:
        rec["prompt_ids"] = list(problem.prompt_ids)
        rec["responses"] = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        rec["response_ids"] = [list(s.response_ids) for s in samples]
    return rec


def rollout_problems(engine, problems: Sequence, sampling: Sampling, verifier, tokenizer, stop_ids,
                     batch_problems: int = 8, keep_responses: bool = True,
                     on_batch: Optional[Callable[[list[dict]], None]] = None, progress: bool = True) -> list[dict]:
    """Generate ``sampling.n`` responses per problem and score them, in batches of problems.

    Each batch's seed depends on the problem ids only (``sampling.seed`` + the first problem's
    position), so a resumed run samples what the uninterrupted one would have."""
    from tqdm import tqdm

    records: list[dict] = []
    bar = tqdm(total=len(problems), desc="problems", unit="problem", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(problems), batch_problems):
            batch = list(problems[start : start + batch_problems])
            seed = sampling.seed * 1_000_003 + int(getattr(batch[0], "index", start))
            groups = generate(engine, [p.prompt_ids for p in batch], sampling.n, sampling, stop_ids, seed)
            flat = [(p, s) for p, g in zip(batch, groups) for s in g]
            texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for _, s in flat]
            results = verifier.score(texts, [p for p, _ in flat]).results
            n = sampling.n
            recs = [problem_record(p, g, results[i * n : (i + 1) * n], tokenizer, keep_responses)
                    for i, (p, g) in enumerate(zip(batch, groups))]
            records.extend(recs)
            if on_batch:
                on_batch(recs)
            bar.update(len(batch))
    finally:
        bar.close()
    return records


# --- per-problem results files ---------------------------------------------------------------


class ResultsFileError(ValueError):
    pass


def read_records(path: str, repair: bool = False) -> list[dict]:
    """Records of a results file. A final line without its newline that is not valid JSON is
    an interrupted write: dropped (and cut from the file when ``repair``). Any other bad line
    is a ResultsFileError naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    records, good_bytes = [], 0
    for i, line in enumerate(lines, 1):
        last = i == len(lines)
        if not line.strip():
            good_bytes += len(line) + (0 if last else 1)
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict) or "id" not in rec or "correct" not in rec:
                raise ValueError("not a per-problem record (needs 'id' and 'correct')")
        except (ValueError, UnicodeDecodeError) as exc:
            if last:  # torn write at the end
                logger.warning("%s: dropping an incomplete last line (interrupted write)", path)
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(good_bytes)
                break
            raise ResultsFileError(f"{path}:{i}: not a valid per-problem record ({exc}); move the file away "
                                   "or fix the line to resume") from None
        records.append(rec)
        good_bytes += len(line) + (0 if last else 1)
    return records


def append_records(path: str, records: Iterable[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Rollout:
    """One sampled response of one problem (what the analysis tools score)."""

    problem: int
    sample: int
    prompt: Any
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    correct: bool
    solution: Optional[str] = None
    answer: Optional[str] = None
    meta: dict = field(default_factory=dict)


def flatten(records: Sequence[dict]) -> list[Rollout]:
    """Every response of every record (needs records written with responses)."""
    out = []
    for p, rec in enumerate(records):
        if "response_ids" not in rec:
            raise ResultsFileError(f"problem {rec.get('id')}: the record has no response_ids (written with "
                                   "--no-save-responses); rerun tools/evaluate.py with responses saved")
        for k, (ids, text, ok) in enumerate(zip(rec["response_ids"], rec["responses"], rec["correct"])):
            out.append(Rollout(p, k, rec.get("messages") or rec["prompt"], rec["prompt_ids"], ids, text, ok,
                               rec.get("solution"), rec.get("answer"), {"id": rec["id"]}))
    return out
