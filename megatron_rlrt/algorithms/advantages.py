"""Group-relative (GRPO) sequence advantages.

Rollouts are laid out group-major: rows ``[g*K, (g+1)*K)`` are the K rollouts of prompt g.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    grouped = r.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=True, keepdim=True)
    adv = grouped - mean
    if std_normalize:
        adv = adv / (std + eps)
    zero_group = (grouped == grouped[:, :1]).all(dim=1)
    adv = torch.where(zero_group[:, None], torch.zeros_like(adv), adv)

    stats = GroupStats(
        num_groups=grouped.shape[0],
        num_zero_signal_groups=int(zero_group.sum()),
        zero_signal_mask=zero_group.repeat_interleave(group_size),
        group_mean=mean.expand_as(grouped).reshape(-1),
        group_std=std.expand_as(grouped).reshape(-1),
    )
    return adv.reshape(-1), stats
