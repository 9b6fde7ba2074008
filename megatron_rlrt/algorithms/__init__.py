"""The algorithm core: RLRT, GRPO and the self-distillation baselines as pure torch functions.

Nothing here is distributed; ``megatron_rlrt.packing`` builds the packed batches they read.
This package exports what the trainer and plug-in methods use (registries, losses, token
advantages, teacher views); everything else is imported from its module
(``algorithms.diagnostics``, ``algorithms.teacher``, ...).
"""

from megatron_rlrt.algorithms.advantages import (
    ADVANTAGES,
    GroupStats,
    get_advantage,
    group_advantages,
    group_stats,
    grouped_rewards,
    register_advantage,
)
from megatron_rlrt.algorithms.distillation import distillation_token_loss
from megatron_rlrt.algorithms.methods import (
    METHODS,
    SUCCESS_THRESHOLD,
    MethodSpec,
    ModelReward,
    RewardView,
    get_method,
    register_method,
)
from megatron_rlrt.algorithms.objective import loss_token_mask, total_loss
from megatron_rlrt.algorithms.policy_loss import PolicyLossConfig, policy_token_loss
from megatron_rlrt.algorithms.schedules import make_lambda_schedule
from megatron_rlrt.algorithms.teacher import TeacherConfig, build_teacher_views
from megatron_rlrt.algorithms.token_advantages import token_advantages
from megatron_rlrt.algorithms.token_weights import information_asymmetry, rlrt_weight, rlsd_weight
from megatron_rlrt.algorithms import rlt as _rlt  # noqa: F401,E402  registers "rlt" (atesd: via teacher)

__all__ = [
    "ADVANTAGES",
    "GroupStats",
    "METHODS",
    "MethodSpec",
    "ModelReward",
    "PolicyLossConfig",
    "RewardView",
    "SUCCESS_THRESHOLD",
    "TeacherConfig",
    "build_teacher_views",
    "distillation_token_loss",
    "get_advantage",
    "get_method",
    "group_advantages",
    "group_stats",
    "grouped_rewards",
    "information_asymmetry",
    "loss_token_mask",
    "make_lambda_schedule",
    "policy_token_loss",
    "register_advantage",
    "register_method",
    "rlrt_weight",
    "rlsd_weight",
    "token_advantages",
    "total_loss",
]
