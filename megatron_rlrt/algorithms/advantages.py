"""Sequence-level advantages A, by name: ``ADVANTAGES`` (GRPO's group advantage first).

An estimator is ``fn(rewards [B], group_size, std_normalize) -> (A [B], GroupStats)``;
a method names its estimator in ``MethodSpec.advantage``. Adding one (RLOO, a baseline of
your own) is one function under ``@register_advantage("name")``; ``group_stats`` gives the
statistics the trainer reads (zero-signal groups for dynamic sampling and teacher views).

Rollouts are laid out group-major: rows ``[g*K, (g+1)*K)`` are the K rollouts of prompt g.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class GroupStats:
    """What the trainer needs to know about the groups of one batch.

    ``zero_signal_mask`` is per sample (True for every rollout of a group whose rewards are
    all equal: its advantages are exactly 0, so it carries no policy-gradient signal and the
    trainer may drop it, DAPO dynamic-sampling style).
    """

    num_groups: int
    num_zero_signal_groups: int
    zero_signal_mask: torch.Tensor  # bool [B]
    group_mean: torch.Tensor  # [B], the group's mean reward repeated per sample
    group_std: torch.Tensor  # [B], unbiased std of the group repeated per sample


AdvantageFn = Callable[[torch.Tensor, int, bool], "tuple[torch.Tensor, GroupStats]"]

ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: ``@register_advantage("rloo") def rloo(rewards, group_size, std_normalize): ...``"""

    def register(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return register


def get_advantage(name: str) -> AdvantageFn:
    try:
        return ADVANTAGES[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGES)}") from None


def grouped_rewards(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 rewards [B / K, K] of one batch, checked (1-D, finite, whole groups of K >= 2)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    batch = rewards.shape[0]
    if batch == 0 or batch % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the batch size {batch}")
    r = rewards.detach().to(torch.float32)
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf")
    return r.view(-1, group_size)


def group_stats(rewards: torch.Tensor, group_size: int) -> GroupStats:
    """The group statistics of a batch of rewards (for estimators of your own)."""
    grouped = grouped_rewards(rewards, group_size)
    return _stats(grouped, grouped.mean(dim=1, keepdim=True), grouped.std(dim=1, unbiased=True, keepdim=True))


def _stats(grouped: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> GroupStats:
    group_size = grouped.shape[1]
    zero_group = (grouped == grouped[:, :1]).all(dim=1)
    return GroupStats(
        num_groups=grouped.shape[0],
        num_zero_signal_groups=int(zero_group.sum()),
        zero_signal_mask=zero_group.repeat_interleave(group_size),
        group_mean=mean.expand_as(grouped).reshape(-1),
        group_std=std.expand_as(grouped).reshape(-1),
    )


@register_advantage("grpo")
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    std_normalize: bool,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, GroupStats]:
    """GRPO advantage A = r - mean(group), optionally / (unbiased std(group) + eps) (as verl).

    Groups with all-equal rewards get A = 0 exactly (r - mean = 0, and 0 / (0 + eps) = 0).
    Paper Table 5: std normalisation off for GRPO/SRPO (Dr. GRPO), on for RLSD/RLRT.
    """
    grouped = grouped_rewards(rewards, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=True, keepdim=True)
    adv = grouped - mean
    if std_normalize:
        adv = adv / (std + eps)
    stats = _stats(grouped, mean, std)
    adv = torch.where(stats.zero_signal_mask.view_as(grouped), torch.zeros_like(adv), adv)
    return adv.reshape(-1), stats
