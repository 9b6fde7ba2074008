"""Deterministic shuffling with a resumable position.

The order of epoch ``e`` is ``numpy.random.default_rng([seed, e]).permutation(n)``: a pure
function of (seed, epoch, n), so a resumed run rebuilds it without saving it. The state is
just ``{"seed", "epoch", "position", "num_samples", "shuffle"}``; after ``load_state_dict``
the sampler continues with exactly the indices an uninterrupted run would have produced.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np


class ResumableSampler:
    """An endless stream of dataset indices, epoch after epoch."""

    def __init__(self, num_samples: int, seed: int = 1234, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # next index into the current epoch's order
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def order(self, epoch: int) -> np.ndarray:
        """The index order of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def _current(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = self.order(self.epoch)
            self._order_epoch = self.epoch
        assert self._order is not None
        return self._order

    def next_indices(self, count: int) -> list[int]:
        """The next ``count`` indices, crossing into the next (reshuffled) epoch as needed."""
        out: list[int] = []
        while len(out) < count:
            order = self._current()
            take = min(count - len(out), self.num_samples - self.position)
            out.extend(int(i) for i in order[self.position : self.position + take])
            self.position += take
            if self.position == self.num_samples:
                self.epoch += 1
                self.position = 0
        return out

    def __iter__(self) -> Iterator[int]:
        while True:
            yield self.next_indices(1)[0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state saved for another dataset size or seed."""
        for key in ("seed", "num_samples", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this run has "
                    f"{key}={getattr(self, key)!r}: the data or seed changed, so the saved position "
                    "does not point at the same prompts"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_samples:
            raise ValueError(f"invalid sampler state epoch={epoch} position={position} for {self.num_samples} samples")
        self.epoch, self.position = epoch, position


class PromptLoader:
    """Batches of prompts from a dataset in resumable shuffled order."""

    def __init__(self, dataset: Sequence[Any], seed: int = 1234, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.sampler = ResumableSampler(len(dataset), seed, shuffle)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def next_batch(self, batch_size: int) -> list[Any]:
        return [self.dataset[i] for i in self.sampler.next_indices(batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
