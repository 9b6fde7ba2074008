"""``math``: final answers checked with math-verify against the sample's gold answer.

Extraction (``extract.py``): text after the last ``</think>``, last ``\\boxed{}``/``\\fbox{}``,
else the last ``Answer:`` line. Extraction and checking, ``verify(parse(gold), parse(pred))``,
both run in a worker process under a hard per-item timeout.
"""

from __future__ import annotations

from typing import Any

from megatron_rlrt.reward import worker
from megatron_rlrt.reward.base import RewardResult, sample_field
from megatron_rlrt.reward.extract import extract_math_answer
from megatron_rlrt.reward.pooled import PooledVerifier


class MathVerifier(PooledVerifier):
    """Reward 1.0 when the extracted answer is mathematically equal to ``sample["answer"]``."""

    name = "math"
    item_fn = staticmethod(worker.score_math)
    extract_fn = staticmethod(extract_math_answer)

    def __init__(self, answer_line_fallback: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.answer_line_fallback = answer_line_fallback

    def prepare(self, response: str, sample: Any) -> RewardResult | tuple[str, tuple]:
        gold = sample_field(sample, "answer")
        if gold is None or not str(gold).strip():
            return RewardResult.fail("bad_gold", detail="the sample has no gold answer")
        return (self.answer_line_fallback,), (str(gold), self.inner_timeout_s)
