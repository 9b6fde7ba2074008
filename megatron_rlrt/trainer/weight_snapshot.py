"""Frozen copies of this rank's model parameters, swapped into the live model for a forward.

The reference policy (``--kl-coef > 0``) and a non-current teacher (``--teacher-weights
initial|ema``) are the same model with other weights. Instead of a second model (and a second
set of activations, pipeline schedules and TP shards), we keep a copy of this rank's parameter
shards in host memory and copy it into the model for the no-grad pass that needs it, as
slime does for its reference model. Swapping back restores the policy bit for bit.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def _params(chunks) -> list[torch.Tensor]:
    return [p for c in chunks for p in c.parameters()]


def _copy_into(params: list[torch.Tensor], tensors: list[torch.Tensor], non_blocking: bool = False) -> None:
    with torch.no_grad():
        for p, t in zip(params, tensors):
            p.copy_(t, non_blocking=non_blocking)


class WeightSnapshot:
    """This rank's parameter shards, in host memory (pinned when CUDA is there)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors

    @classmethod
    def of(cls, chunks) -> "WeightSnapshot":
        pin = torch.cuda.is_available()  # pinned: the swaps copy host -> GPU asynchronously
        return cls([torch.empty(p.shape, dtype=p.dtype, pin_memory=pin).copy_(p.detach()) for p in _params(chunks)])

    @contextmanager
    def swapped_in(self, chunks):
        """Run the body with these weights in ``chunks``; the model's own weights come back
        afterwards, also when the body raises."""
        params = _params(chunks)
        if len(params) != len(self.tensors):
            raise RuntimeError(f"snapshot holds {len(self.tensors)} tensors, the model has {len(params)} parameters")
        own = WeightSnapshot.of(chunks)
        try:
            _copy_into(params, self.tensors, non_blocking=True)
            yield
        finally:
            _copy_into(params, own.tensors)

    def copy(self) -> "WeightSnapshot":
        """An independent snapshot of the same weights (one that will move must not be shared)."""
        return WeightSnapshot([t.clone() for t in self.tensors])

    def ema_update(self, chunks, rate: float) -> None:
        """theta_T <- (1 - rate) * theta_T + rate * theta (the --teacher-weights ema teacher, the
        --ref-update-interval reference; rate 1 copies theta)."""
        with torch.no_grad():
            for t, p in zip(self.tensors, _params(chunks)):
                t.mul_(1 - rate).add_(p.detach().to("cpu", dtype=t.dtype), alpha=rate)

    # -- checkpoints: written as a model directory (dist_checkpointing, any TP/PP) ---------------

    def save(self, chunks, directory: str) -> None:
        from megatron_rlrt.models.megatron_checkpoint import write_model_dir

        with self.swapped_in(chunks):
            write_model_dir(chunks, directory)

    @classmethod
    def load(cls, chunks, directory: str) -> "WeightSnapshot":
        """Read a snapshot saved by :meth:`save` (collective), leaving the model's weights as they were."""
        from megatron_rlrt.models.megatron_checkpoint import read_model_dir

        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: no saved weight snapshot")
        return cls.loaded_by(chunks, lambda: read_model_dir(chunks, directory))

    @classmethod
    def loaded_by(cls, chunks, load_into_model) -> "WeightSnapshot":
        """The weights ``load_into_model()`` puts into ``chunks`` (any loader of full checkpoints),
        taken as a snapshot; the model's own weights are back afterwards, also when loading fails."""
        own = cls.of(chunks)
        try:
            load_into_model()
            return cls.of(chunks)
        finally:
            _copy_into(_params(chunks), own.tensors)
