"""Base for verifiers that extract in the trainer process and check in the scoring pool."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from megatron_rlrt.reward.base import RewardBatch, RewardResult, Verifier
from megatron_rlrt.reward.pool import ScoringPool


class PooledVerifier(Verifier):
    """Subclasses implement ``prepare`` (cheap, in-process) and name a worker function.

    ``prepare(response, sample)`` returns either a finished :class:`RewardResult` (e.g. no
    answer found: no need to cross a process boundary) or ``(extracted, args)`` where
    ``args`` is the tuple passed to ``item_fn`` in a worker.
    """

    item_fn: Callable[..., tuple] | None = None

    def __init__(
        self,
        timeout_s: float = 10.0,
        num_workers: int | None = None,
        pool: ScoringPool | None = None,
        batch_timeout_s: float | None = None,
        start_method: str = "fork",
        worker_memory_mb: int | None = None,
        progress: bool = False,
        item_fn: Callable[..., tuple] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.batch_timeout_s = batch_timeout_s
        self.progress = progress
        self._owns_pool = pool is None
        self.pool = pool or ScoringPool(num_workers, start_method, worker_memory_mb)
        if item_fn is not None:  # e.g. a deliberately hanging function in tests
            self.item_fn = item_fn

    @property
    def inner_timeout_s(self) -> int:
        """math-verify's own (signal.alarm, whole seconds) limit: below the outside kill."""
        return max(1, int(self.timeout_s // 3))

    def prepare(self, response: str, sample: Any) -> RewardResult | tuple[str, tuple]:
        raise NotImplementedError

    def finish(self, reward: float, correct: bool, reason: str, detail: str, extracted: str) -> RewardResult:
        return RewardResult(reward, correct, reason, extracted, detail)

    def score(self, responses: Sequence[str], samples: Sequence[Any]) -> RewardBatch:
        self._check_lengths(responses, samples)
        started = time.perf_counter()
        results: list[RewardResult | None] = [None] * len(responses)
        pending: list[tuple[int, str, tuple]] = []
        for i, (resp, sample) in enumerate(zip(responses, samples)):
            prepared = self.prepare(resp if isinstance(resp, str) else "", sample)
            if isinstance(prepared, RewardResult):
                results[i] = prepared
            else:
                pending.append((i, prepared[0], prepared[1]))
        outcomes = self.pool.map(
            self.item_fn,
            [args for _, _, args in pending],
            timeout_s=self.timeout_s,
            batch_timeout_s=self.batch_timeout_s,
            progress=self.progress,
            desc=f"scoring ({self.name})",
        )
        killed = 0
        for (i, extracted, _), out in zip(pending, outcomes):
            if out.status == "ok":
                results[i] = self.finish(*out.value, extracted=extracted)
            else:
                killed += out.status == "timeout"
                results[i] = RewardResult.fail(out.status, extracted, out.detail)
        return RewardBatch.from_results(results, started, killed=killed)  # type: ignore[arg-type]

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()
