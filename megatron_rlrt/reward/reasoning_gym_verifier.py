"""``reasoning_gym``: a reasoning-gym task scores the answer with its own ``score_answer``.

The sample must carry ``metadata["reasoning_gym"] = {"task", "seed", "size", "config",
"index", "entry"}`` as written by ``megatron_rlrt.data.generators.reasoning_gym_rows``; the
worker rebuilds the dataset and entry from it, so scoring works after a jsonl round-trip.
Answer extraction: the last ``<answer>...</answer>`` after any ``</think>``, else the last
``\\boxed{}``; a response with neither scores 0 (``no_answer``), not the small format
credit some tasks give ``score_answer(None, entry)``. The task may give partial credit; ``correct`` means
``score >= correct_threshold`` and ``binary=True`` makes the reward that 0/1 value.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

from megatron_rlrt.reward import worker
from megatron_rlrt.reward.base import RewardResult, sample_field
from megatron_rlrt.reward.extract import extract_tagged_answer
from megatron_rlrt.reward.pooled import PooledVerifier

METADATA_KEY = "reasoning_gym"
REQUIRED_META = ("task", "seed", "size", "index")


class ReasoningGymVerifier(PooledVerifier):
    name = "reasoning_gym"
    item_fn = staticmethod(worker.score_reasoning_gym)
    extract_fn = staticmethod(extract_tagged_answer)

    def __init__(self, correct_threshold: float = 1.0, binary: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # imported before the pool forks its workers: otherwise every worker's first item pays
        # the import (seconds on a busy machine) inside its timeout, and a timed-out item would
        # score 0 depending on machine load
        with contextlib.suppress(ImportError):  # missing: each item fails with the import error
            importlib.import_module("reasoning_gym")
        self.correct_threshold = correct_threshold
        self.binary = binary

    def prepare(self, response: str, sample: Any) -> RewardResult | tuple[str, tuple]:
        meta = (sample_field(sample, "metadata") or {}).get(METADATA_KEY)
        if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_META):
            return RewardResult.fail(
                "bad_gold",
                detail=f"sample lacks metadata[{METADATA_KEY!r}] with keys {REQUIRED_META}",
            )
        return (), (meta, self.correct_threshold)

    def finish(self, reward: float, correct: bool, reason: str, detail: str, extracted: str) -> RewardResult:
        if self.binary:
            reward = 1.0 if correct else 0.0
        return RewardResult(reward, correct, reason, extracted, detail)
