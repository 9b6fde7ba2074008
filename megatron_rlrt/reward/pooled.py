"""Base for verifiers that extract and check an answer in the scoring pool (timed workers)."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from megatron_rlrt.reward import worker
from megatron_rlrt.reward.base import RewardBatch, RewardResult, Verifier
from megatron_rlrt.reward.pool import ScoringPool


class PooledVerifier(Verifier):
    """Subclasses implement ``prepare`` (cheap, in-process) and name worker functions.

    ``prepare(response, sample)`` returns either a finished :class:`RewardResult` (e.g. the
    sample has no gold answer) or ``(extracted, args)`` where ``args`` is the tuple passed to
    ``item_fn(extracted, ...)`` in a worker. A subclass that sets ``extract_fn`` (a
    module-level ``fn(response, *extract_args) -> (answer | None, reason)``) instead returns
    ``(extract_args, args)`` with ``extracted`` None: extraction then runs inside the timed
    worker too (worker.extract_and_score), so a pathological response costs at most the timeout.
    """

    item_fn: Callable[..., tuple] | None = None
    extract_fn: Callable[..., tuple] | None = None

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
        tasks: list[tuple] = []
        for i, (resp, sample) in enumerate(zip(responses, samples)):
            resp = resp if isinstance(resp, str) else ""
            prepared = self.prepare(resp, sample)
            if isinstance(prepared, RewardResult):
                results[i] = prepared
            elif self.extract_fn is not None:
                pending.append((i, None, prepared[1]))
                tasks.append((self.extract_fn, prepared[0], self.item_fn, resp, prepared[1]))
            else:
                pending.append((i, prepared[0], prepared[1]))
                tasks.append(prepared[1])
        outcomes = self.pool.map(
            worker.extract_and_score if self.extract_fn is not None else self.item_fn,
            tasks,
            timeout_s=self.timeout_s,
            batch_timeout_s=self.batch_timeout_s,
            progress=self.progress,
            desc=f"scoring ({self.name})",
        )
        killed = 0
        for (i, extracted, _), out in zip(pending, outcomes):
            if out.status == "ok" and self.extract_fn is not None:
                *score, extracted = out.value
                results[i] = (self.finish(*score, extracted=extracted) if extracted is not None
                              else RewardResult.fail(score[2]))
            elif out.status == "ok":
                results[i] = self.finish(*out.value, extracted=extracted)
            else:
                killed += out.status == "timeout"
                results[i] = RewardResult.fail(out.status, extracted, out.detail)
        return RewardBatch.from_results(results, started, killed=killed)  # type: ignore[arg-type]

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()
