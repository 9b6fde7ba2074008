"""Prompt datasets: rows from jsonl/json/parquet -> rendered, tokenized :class:`PromptSample` s.

Bad input, and what happens (``DatasetError`` names the file, the 1-based row and what was
expected; a counted skip is reported once per load in one log line and kept in
``PromptDataset.stats``):

==========================================================  =====================================
input                                                       rule
==========================================================  =====================================
file does not exist                                         ``FileNotFoundError`` naming the path
file name not .jsonl/.jsonl.gz/.ndjson/.json/.parquet/.pq   error (lists the supported endings)
line not valid UTF-8, invalid JSON, row not an object       error (file, row, byte/column)
layout not recognisable from the columns                    error (lists the columns, the keys)
row lacks the prompt column, or the answer column (when     error (file, row, the column, the
the layout has no fallback), or an explicitly named          row's keys)
solution column
prompt of the wrong type (not a string or a list of         error (file, row, what was expected)
{"role", "content"} messages), answer not string/number
prompt empty or whitespace (or messages with no content)    skip ``empty_prompt``
answer null/empty (MATH layout: and no \\boxed{} in the     skip ``empty_answer``
solution to take it from)
rendered prompt longer than ``max_prompt_length`` tokens    skip ``too_long``
every row skipped                                           error (nothing to train on)
==========================================================  =====================================

An answer that is present but unparseable by math-verify is NOT checked here (that needs
sympy and a timeout): the reward scores such samples 0 with reason ``bad_gold``, counted in
the reward stats.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from megatron_rlrt.data.errors import DatasetError
from megatron_rlrt.data.layouts import Columns, get_path, is_missing, resolve_columns, top_level
from megatron_rlrt.data.readers import file_format, iter_rows, parquet_columns
from megatron_rlrt.data.template import ROLES, PromptRenderer, TemplateConfig

logger = logging.getLogger(__name__)

SKIP_REASONS = ("empty_prompt", "empty_answer", "too_long")


@dataclass
class PromptSample:
    """One training prompt; ``index`` is its position in the dataset (what the sampler yields)."""

    index: int
    source: str  # "file:row" for messages and debugging
    prompt: str | list[dict[str, str]]  # as in the file
    messages: list[dict[str, str]]  # after system prompt / instruction
    prompt_text: str
    prompt_ids: list[int]
    answer: str
    solution: str | None = None
    verifier: str | None = None  # reward name; None: the trainer's default
    data_source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where prompts come from and how they are rendered."""

    path: str | list[str] = ""
    """One or more .jsonl/.jsonl.gz/.json/.parquet files, concatenated in order."""
    layout: str = "auto"
    """auto | dapo | math | gsm8k | rlrt (see megatron_rlrt.data.layouts)."""
    prompt_key: str | None = None
    answer_key: str | None = None
    solution_key: str | None = None
    verifier: str | None = None
    """Reward for rows that carry no 'verifier' column (None: the trainer's default)."""
    max_prompt_length: int | None = None
    """Rows whose rendered prompt has more tokens are skipped and counted."""
    template: TemplateConfig = field(default_factory=TemplateConfig)


@dataclass
class DatasetStats:
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "file:row"

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(where)

    def summary(self) -> str:
        parts = [f"{r}={n} (e.g. {', '.join(self.examples.get(r, []))})" for r, n in sorted(self.skipped.items())]
        return f"kept {self.kept} of {self.rows} rows" + (f"; skipped {'; '.join(parts)}" if parts else "")


def _answer_text(path: str, row: int, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise DatasetError(path, row, f"answer is a boolean ({value}); expected a string or a number")
    if isinstance(value, (int, float)):
        return None if isinstance(value, float) and math.isnan(value) else str(value)
    if isinstance(value, str):
        return value.strip() or None
    raise DatasetError(path, row, f"answer is a {type(value).__name__}; expected a string or a number")


def _check_prompt(path: str, row: int, value: Any) -> bool:
    """True if the prompt has content; DatasetError if it has the wrong shape."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (list, tuple)):
        for i, m in enumerate(value):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DatasetError(path, row, f"prompt message {i} is {m!r:.80}; expected {{'role': ..., 'content': ...}}")
            if m["role"] not in ROLES:
                raise DatasetError(path, row, f"prompt message {i} has role {m['role']!r}; expected one of {ROLES}")
            if not isinstance(m["content"], str):
                raise DatasetError(path, row, f"prompt message {i} content is {type(m['content']).__name__}; expected a string")
        if value and not any(m["role"] == "user" for m in value):
            raise DatasetError(path, row, "prompt messages contain no 'user' message")
        return any(m["content"].strip() for m in value)
    raise DatasetError(path, row, f"prompt is a {type(value).__name__}; expected a string or a list of chat messages")


def _first_row_columns(path: str) -> list[str]:
    if file_format(path) == "parquet" and os.path.exists(path):
        return parquet_columns(path)
    for _, row in iter_rows(path):
        return list(row)
    raise DatasetError(path, None, "the file has no rows")


def _metadata(row: dict, used: set[str]) -> dict[str, Any]:
    """Everything the row carries besides the consumed columns; a 'metadata' dict is merged in."""
    meta = {k: v for k, v in row.items() if k not in used and k != "metadata"}
    if isinstance(row.get("metadata"), dict):
        meta.update(row["metadata"])
    return meta


def _parse_row(path: str, row_no: int, row: dict, spec: Columns, stats: DatasetStats) -> dict | None:
    """The row's fields, or None for a counted skip."""
    from megatron_rlrt.reward.extract import last_boxed

    where = f"{path}:{row_no}"
    prompt = get_path(row, spec.prompt)
    if is_missing(prompt):
        raise DatasetError(path, row_no, f"missing the prompt column {spec.prompt!r} (layout {spec.name}); row has {sorted(row)}")
    if prompt is None or not _check_prompt(path, row_no, prompt):
        stats.skip("empty_prompt", where)
        return None

    solution = None
    if spec.solution:
        raw = get_path(row, spec.solution)
        if is_missing(raw):
            if spec.solution_required:
                raise DatasetError(path, row_no, f"missing the solution column {spec.solution!r}; row has {sorted(row)}")
        elif raw is not None:
            if not isinstance(raw, str):
                raise DatasetError(path, row_no, f"solution is a {type(raw).__name__}; expected a string")
            solution = raw.strip() or None

    raw_answer = get_path(row, spec.answer) if spec.answer else None
    if spec.answer and is_missing(raw_answer):
        if spec.answer_required:
            raise DatasetError(path, row_no, f"missing the answer column {spec.answer!r} (layout {spec.name}); row has {sorted(row)}")
        raw_answer = None
    answer = _answer_text(path, row_no, raw_answer)
    if answer is not None and spec.answer_format == "gsm8k" and "####" in answer:
        reasoning, answer = answer.rsplit("####", 1)
        answer = answer.strip().replace(",", "") or None
        solution = solution or reasoning.strip() or None
    if answer is None and not spec.answer_required and solution:
        answer = last_boxed(solution) or None
    if answer is None:
        stats.skip("empty_answer", where)
        return None

    used = {top_level(spec.prompt), top_level(spec.answer), top_level(spec.solution), "verifier", "data_source"}
    verifier = row.get("verifier")
    data_source = row.get("data_source")
    return {
        "source": where,
        "prompt": prompt if isinstance(prompt, str) else [dict(m) for m in prompt],
        "answer": answer,
        "solution": solution,
        "verifier": verifier if isinstance(verifier, str) and verifier else None,
        "data_source": data_source if isinstance(data_source, str) else None,
        "metadata": _metadata(row, used),
    }


class PromptDataset(Sequence[PromptSample]):
    """All prompts of one or more files, rendered and tokenized up front (so the length filter
    and the sampler see the final set)."""

    def __init__(self, samples: list[PromptSample], stats: DatasetStats) -> None:
        self.samples = samples
        self.stats = stats

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):  # type: ignore[override]
        return self.samples[i]

    @classmethod
    def from_config(cls, config: DataConfig, tokenizer: Any, encode_batch: int = 1024) -> "PromptDataset":
        paths = [config.path] if isinstance(config.path, (str, os.PathLike)) else list(config.path)
        if not paths or not all(paths):
            raise ValueError("DataConfig.path is empty: give at least one dataset file")
        renderer = PromptRenderer(tokenizer, config.template)
        stats = DatasetStats()
        parsed: list[dict] = []
        for path in paths:
            path = os.fspath(path)
            spec = resolve_columns(
                path, _first_row_columns(path), config.layout, config.prompt_key, config.answer_key, config.solution_key
            )
            for row_no, row in iter_rows(path):
                stats.rows += 1
                fields = _parse_row(path, row_no, row, spec, stats)
                if fields is not None:
                    if fields["verifier"] is None:
                        fields["verifier"] = config.verifier
                    parsed.append(fields)

        samples: list[PromptSample] = []
        for start in range(0, len(parsed), encode_batch):
            chunk = parsed[start : start + encode_batch]
            messages = [renderer.build_messages(f["prompt"]) for f in chunk]
            texts = [renderer.render_messages(m) for m in messages]
            for f, msgs, text, ids in zip(chunk, messages, texts, renderer.encode(texts)):
                if config.max_prompt_length and len(ids) > config.max_prompt_length:
                    stats.skip("too_long", f"{f['source']} ({len(ids)} tokens)")
                    continue
                samples.append(PromptSample(index=len(samples), messages=msgs, prompt_text=text, prompt_ids=ids, **f))
        stats.kept = len(samples)

        names = ", ".join(os.fspath(p) for p in paths)
        if stats.skipped:
            logger.warning("prompt data %s: %s", names, stats.summary())
        else:
            logger.info("prompt data %s: %s", names, stats.summary())
        if not samples:
            raise DatasetError(names, None, f"no usable prompts: {stats.summary()}")
        return cls(samples, stats)


def load_prompt_dataset(path: str | list[str], tokenizer: Any, **kwargs: Any) -> PromptDataset:
    """Shorthand: ``load_prompt_dataset("dapo.parquet", tok, max_prompt_length=1024,
    template=TemplateConfig(enable_thinking=False))``."""
    return PromptDataset.from_config(DataConfig(path=path, **kwargs), tokenizer)
