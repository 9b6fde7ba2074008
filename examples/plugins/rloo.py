"""A method as a plug-in: RLOO's leave-one-out baseline with GRPO's clipped surrogate.

This file is the whole method: one advantage estimator and one registration. Train with it

    megatron-rlrt-train --plugins examples/plugins/rloo.py --advantage-estimator rloo ...

(``--plugins`` takes dotted module names or .py paths, comma-separated; every rank imports
them before the config is checked). Its test: tests/test_plugins.py.
"""

import torch

from megatron_rlrt.algorithms import MethodSpec, group_stats, grouped_rewards, register_advantage, register_method


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, group_size: int, std_normalize: bool, eps: float = 1e-6):
    """A_i = r_i - mean of the OTHER K-1 rewards of the group (Ahmadian et al. 2024); with
    ``std_normalize``, divided by the group's std + eps as GRPO does."""
    grouped = grouped_rewards(rewards, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    adv = grouped - others
    stats = group_stats(rewards, group_size)
    if std_normalize:
        adv = adv / (stats.group_std.view_as(grouped) + eps)
    return adv.reshape(-1), stats


register_method(MethodSpec("rloo", advantage="rloo"))
