"""One RL step's data: rollouts, rewards, advantages and teacher prompts, per sample.

Built on rank 0 (where the rollout engine and verifiers live), broadcast to every rank as
plain Python lists (``Trainer._on_rank0``), then split: samples -> optimizer mini-batches (whole groups, in order) ->
this data-parallel rank's share of each mini-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass
class Sample:
    """One rollout and everything the update needs to know about it."""

    index: int  # position in the step's batch (sample id)
    group: int  # prompt index within the step
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    reward: float
    correct: bool
    advantage: float
    teacher_prompt_ids: Optional[list[int]] = None

    @property
    def has_teacher(self) -> bool:
        return self.teacher_prompt_ids is not None


@dataclass
class RolloutBatch:
    samples: list[Sample]
    group_size: int
    metrics: dict = field(default_factory=dict)  # rank-0 rollout/reward/teacher statistics

    def minibatches(self, samples_per_minibatch: int) -> list[list[Sample]]:
        """Consecutive whole-group mini-batches (the batch is group-ordered)."""
        return [self.samples[i : i + samples_per_minibatch]
                for i in range(0, len(self.samples), samples_per_minibatch)]


def dp_shard(samples: list[Sample], dp_rank: int, dp_size: int) -> list[Sample]:
    """This data-parallel rank's share: a balanced split by token count, deterministic on
    every rank (longest-first onto the least-loaded rank), each sample kept whole with its
    teacher row."""
    loads = [0] * dp_size
    owner = {}
    for s in sorted(samples, key=lambda s: (-(len(s.prompt_ids) + 2 * len(s.response_ids)
                                              + len(s.teacher_prompt_ids or [])), s.index)):
        rank = min(range(dp_size), key=lambda r: (loads[r], r))
        loads[rank] += len(s.prompt_ids) + len(s.response_ids) + (
            len(s.teacher_prompt_ids) + len(s.response_ids) if s.has_teacher else 0)
        owner[s.index] = rank
    return [s for s in samples if owner[s.index] == dp_rank]


def padded(values: Sequence[Sequence[float] | torch.Tensor], width: int, dtype=torch.float32) -> torch.Tensor:
    """[len(values), width] with each row's values first and zeros after (lists or 1-D tensors)."""
    out = torch.zeros((len(values), width), dtype=dtype)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.as_tensor(v, dtype=dtype)
    return out
