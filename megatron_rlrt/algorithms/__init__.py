"""The algorithm core: RLRT, GRPO and the self-distillation baselines as pure torch functions.

Nothing here is distributed; ``megatron_rlrt.packing`` builds the packed batches they read.
"""

from megatron_rlrt.algorithms.advantages import GroupStats, group_advantages
from megatron_rlrt.algorithms.diagnostics import (
    credit_diagnostics,
    mean_abs_advantage_shift,
    position_asymmetry,
    positive_asymmetry_fraction,
    teacher_coverage,
    weight_clip_fractions,
    weight_quantiles,
)
from megatron_rlrt.algorithms.distillation import (
    add_tail_bucket,
    distillation_token_loss,
    divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    srpo_entropy_weight,
    topk_entropy,
)
from megatron_rlrt.algorithms.methods import METHODS, SUCCESS_THRESHOLD, MethodSpec, get_method, register_method
from megatron_rlrt.algorithms.objective import distill_rows, loss_token_mask, total_loss
from megatron_rlrt.algorithms.policy_loss import (
    PolicyLossConfig,
    PolicyTokenLoss,
    aggregate_loss,
    kl_penalty,
    policy_loss,
    policy_token_loss,
    ppo_clip_token_loss,
    truncated_is_weight,
)
from megatron_rlrt.algorithms.schedules import ConstantSchedule, LinearDecaySchedule, make_lambda_schedule
from megatron_rlrt.algorithms.teacher import (
    DEFAULT_TEMPLATE,
    TeacherConfig,
    TeacherViews,
    TeacherViewStats,
    TeacherWeights,
    build_teacher_views,
    choose_peers,
    ema_update_,
    fit_teacher_prompt,
    render_teacher_prompt,
    select_teacher_rows,
    strip_thinking,
)
from megatron_rlrt.algorithms.token_advantages import token_advantages
from megatron_rlrt.algorithms.token_weights import (
    information_asymmetry,
    reward_gated_advantage,
    rlrt_weight,
    rlsd_weight,
)

__all__ = [
    "add_tail_bucket",
    "aggregate_loss",
    "build_teacher_views",
    "choose_peers",
    "ConstantSchedule",
    "credit_diagnostics",
    "DEFAULT_TEMPLATE",
    "distill_rows",
    "distillation_token_loss",
    "divergence",
    "ema_update_",
    "fit_teacher_prompt",
    "forward_kl",
    "generalized_jsd",
    "get_method",
    "group_advantages",
    "GroupStats",
    "information_asymmetry",
    "kl_penalty",
    "LinearDecaySchedule",
    "loss_token_mask",
    "make_lambda_schedule",
    "mean_abs_advantage_shift",
    "METHODS",
    "MethodSpec",
    "policy_loss",
    "policy_token_loss",
    "PolicyLossConfig",
    "PolicyTokenLoss",
    "position_asymmetry",
    "positive_asymmetry_fraction",
    "ppo_clip_token_loss",
    "register_method",
    "render_teacher_prompt",
    "reverse_kl",
    "reward_gated_advantage",
    "rlrt_weight",
    "rlsd_weight",
    "select_teacher_rows",
    "srpo_entropy_weight",
    "strip_thinking",
    "SUCCESS_THRESHOLD",
    "teacher_coverage",
    "TeacherConfig",
    "TeacherViews",
    "TeacherViewStats",
    "TeacherWeights",
    "token_advantages",
    "topk_entropy",
    "total_loss",
    "truncated_is_weight",
    "weight_clip_fractions",
    "weight_quantiles",
]
