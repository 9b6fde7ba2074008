"""Token-level credit of RLRT and RLSD, written as in the paper (arXiv 2605.10781).

All inputs are log-probabilities of the SAMPLED tokens y_t, treated as constants (sg):
``student_logprobs`` = log P_S^t(y_t) = log pi(y_t | x, y_<t), ``teacher_logprobs`` =
log P_T^t(y_t) = log pi(y_t | x, c, y_<t) with privileged context c (eq. 1).
"""

from __future__ import annotations

import torch


def information_asymmetry(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Eq. 3: D_t(y_t) = log P_S^t(y_t) - log P_T^t(y_t)   (and Delta_t = -D_t, Sec. 3)."""
    return student_logprobs.detach() - teacher_logprobs.detach()


def rlrt_weight(
    seq_advantages: torch.Tensor, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """Eq. 6: w_t^RLRT = exp(sign(A) * D_t) = (P_S^t(y_t) / P_T^t(y_t))^sign(A).

    ``seq_advantages`` broadcasts against the [B, T] log-probs (pass A[:, None]).
    """
    return torch.exp(torch.sign(seq_advantages) * information_asymmetry(student_logprobs, teacher_logprobs))


def rlsd_weight(
    seq_advantages: torch.Tensor, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """Eq. 2: w_t^RLSD = exp(sign(A) * Delta_t) = (P_T^t(y_t) / P_S^t(y_t))^sign(A) = 1 / w_t^RLRT."""
    return torch.exp(-torch.sign(seq_advantages) * information_asymmetry(student_logprobs, teacher_logprobs))


def reward_gated_advantage(
    seq_advantages: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    lam: float,
    eps_w: float,
) -> torch.Tensor:
    """Eq. 7: A_t = A * [(1 - lam) + lam * clip(w_t, 1 - eps_w, 1 + eps_w)]  if r(y) = 1,
              A_t = A                                                 if r(y) = 0.

    ``gate`` (bool, broadcastable to [B, T]) marks the rows that take the first branch:
    r = 1 rollouts for RLRT; every rollout for RLRT-all and RLSD (Table 4). lam = 0 gives
    A_t = A exactly, and |A_t - A| <= lam * eps_w * |A|.
    """
    mixed = seq_advantages * ((1.0 - lam) + lam * weight.clamp(1.0 - eps_w, 1.0 + eps_w))
    return torch.where(gate, mixed, seq_advantages.expand_as(mixed))
