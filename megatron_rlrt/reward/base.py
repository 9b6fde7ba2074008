"""Result types and the verifier interface shared by every reward.

A verifier scores a batch of ``(response_text, sample)`` pairs. ``sample`` is a mapping (or an
object with attributes, e.g. ``megatron_rlrt.data.PromptSample``) holding at least ``answer``
and, for some verifiers, ``metadata``. Every item gets a :class:`RewardResult`; a failure is
never an exception, it is ``reward=0`` plus a ``reason`` from :data:`REASONS`, counted in the
batch's :class:`RewardStats`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

# Every reason a result can carry, with its meaning (also the stats keys).
REASONS: dict[str, str] = {
    "correct": "the answer verified (reward 1)",
    "partial": "the task's scorer gave partial credit (0 < reward < 1)",
    "wrong": "an answer was found and parsed but does not match",
    "empty_response": "the response is empty or whitespace",
    "unclosed_think": "<think> opened and never closed: no final answer",
    "no_boxed": "math: no \\boxed{}/\\fbox{} and no 'Answer:' line after the reasoning",
    "no_answer": "reasoning-gym: no <answer> tag and no \\boxed{}",
    "parse_error": "the extracted answer could not be parsed (math-verify found nothing)",
    "bad_gold": "the sample's gold answer is missing or unparseable (a data problem)",
    "timeout": "scoring ran past the per-item time limit (inside math-verify or killed from outside)",
    "worker_died": "the scoring worker process died (crash, OOM kill)",
    "error": "the scorer raised; see RewardResult.detail",
}

FAILURE_REASONS = ("timeout", "worker_died", "error")


@dataclass
class RewardResult:
    """One scored response."""

    reward: float
    correct: bool
    reason: str
    extracted: str | None = None
    detail: str = ""

    @classmethod
    def fail(cls, reason: str, extracted: str | None = None, detail: str = "") -> "RewardResult":
        return cls(0.0, False, reason, extracted, detail)


@dataclass
class RewardStats:
    """Per-batch counts: what the trainer logs under ``reward/``."""

    count: int = 0
    reward_sum: float = 0.0
    correct: int = 0
    reasons: Counter = field(default_factory=Counter)
    killed: int = 0  # timeouts enforced from outside (worker killed and replaced)
    elapsed_s: float = 0.0

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.count if self.count else 0.0

    @property
    def timeouts(self) -> int:
        return self.reasons["timeout"]

    @property
    def parse_failures(self) -> int:
        return self.reasons["parse_error"] + self.reasons["no_boxed"] + self.reasons["no_answer"]

    def add(self, result: RewardResult) -> None:
        self.count += 1
        self.reward_sum += result.reward
        self.correct += int(result.correct)
        self.reasons[result.reason] += 1

    def merge(self, other: "RewardStats") -> None:
        self.count += other.count
        self.reward_sum += other.reward_sum
        self.correct += other.correct
        self.reasons.update(other.reasons)
        self.killed += other.killed
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)

    def to_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat metrics for metrics.jsonl (every reason count, even zero, for stable columns)."""
        out = {
            f"{prefix}mean": self.mean_reward,
            f"{prefix}accuracy": self.correct / self.count if self.count else 0.0,
            f"{prefix}count": float(self.count),
            f"{prefix}timeouts": float(self.timeouts),
            f"{prefix}killed": float(self.killed),
            f"{prefix}parse_failures": float(self.parse_failures),
            f"{prefix}score_time_s": self.elapsed_s,
        }
        for reason in REASONS:
            out[f"{prefix}reason/{reason}"] = float(self.reasons[reason])
        return out


@dataclass
class RewardBatch:
    """Results in input order plus the batch's stats."""

    results: list[RewardResult]
    stats: RewardStats

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.results]

    @property
    def correct(self) -> list[bool]:
        return [r.correct for r in self.results]

    def __len__(self) -> int:
        return len(self.results)

    @classmethod
    def from_results(cls, results: list[RewardResult], started: float, killed: int = 0) -> "RewardBatch":
        stats = RewardStats(killed=killed)
        for r in results:
            stats.add(r)
        stats.elapsed_s = time.perf_counter() - started
        return cls(results, stats)


def sample_field(sample: Any, name: str, default: Any = None) -> Any:
    """``sample[name]`` for mappings, ``sample.name`` for objects, else ``default``."""
    if isinstance(sample, Mapping):
        return sample.get(name, default)
    return getattr(sample, name, default)


class Verifier:
    """Interface: ``score(responses, samples) -> RewardBatch``; ``close()`` frees workers."""

    name: str = ""

    def score(self, responses: Sequence[str], samples: Sequence[Any]) -> RewardBatch:
        raise NotImplementedError

    def close(self) -> None:
        """Release processes or other resources; the verifier may be used again afterwards."""

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _check_lengths(responses: Sequence[str], samples: Sequence[Any]) -> None:
        if len(responses) != len(samples):
            raise ValueError(f"{len(responses)} responses but {len(samples)} samples: they must pair up")
