"""``auto``: route each sample to the verifier its ``verifier`` field names.

Datasets may mix tasks (math rows and reasoning-gym rows); a sample without a ``verifier``
field goes to ``default``. All routed verifiers share one worker pool.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Sequence

from megatron_rlrt.reward.base import RewardBatch, RewardResult, RewardStats, Verifier, sample_field
from megatron_rlrt.reward.pool import ScoringPool
from megatron_rlrt.reward.pooled import PooledVerifier


def issubclass_safe(obj: Any, cls: type) -> bool:
    return isinstance(obj, type) and issubclass(obj, cls)


class RewardRouter(Verifier):
    name = "auto"

    def __init__(
        self,
        default: str = "math",
        num_workers: int | None = None,
        start_method: str = "fork",
        worker_memory_mb: int | None = None,
        verifier_kwargs: dict[str, dict[str, Any]] | None = None,
        **common: Any,
    ) -> None:
        """``common`` (timeout_s, batch_timeout_s, progress) goes to every verifier,
        ``verifier_kwargs[name]`` to that one only."""
        self.default = default
        self.pool = ScoringPool(num_workers, start_method, worker_memory_mb)
        self.common = common
        self.verifier_kwargs = verifier_kwargs or {}
        self._verifiers: dict[str, Verifier] = {}
        self.get(default)  # fail now, not mid-training, on an unknown default

    def get(self, name: str) -> Verifier:
        if name not in self._verifiers:
            from megatron_rlrt.reward.registry import reward_factory

            if name == self.name:
                raise ValueError("a sample cannot name the 'auto' verifier")
            factory = reward_factory(name)
            kwargs = {**self.common, **self.verifier_kwargs.get(name, {})}
            params = inspect.signature(factory).parameters
            if "pool" in params or issubclass_safe(factory, PooledVerifier):
                kwargs["pool"] = self.pool  # a verifier that runs in-process takes none
            self._verifiers[name] = factory(**kwargs)
        return self._verifiers[name]

    def score(self, responses: Sequence[str], samples: Sequence[Any]) -> RewardBatch:
        self._check_lengths(responses, samples)
        started = time.perf_counter()
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(sample_field(s, "verifier") or self.default, []).append(i)
        results: list[RewardResult | None] = [None] * len(responses)
        stats = RewardStats()
        for name, idx in groups.items():
            batch = self.get(name).score([responses[i] for i in idx], [samples[i] for i in idx])
            for i, r in zip(idx, batch.results):
                results[i] = r
            stats.merge(batch.stats)
        stats.elapsed_s = time.perf_counter() - started
        return RewardBatch(results, stats)  # type: ignore[arg-type]

    def close(self) -> None:
        for v in self._verifiers.values():
            v.close()
        self.pool.close()
