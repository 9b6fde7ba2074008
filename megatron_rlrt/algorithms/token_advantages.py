"""Per-token advantages A_t for every method: one entry point, ``token_advantages``."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rlrt.algorithms.methods import SUCCESS_THRESHOLD, get_method, is_correct
from megatron_rlrt.algorithms.token_weights import reward_gated_advantage


def token_advantages(
    method: str,
    seq_advantages: torch.Tensor,
    rewards: torch.Tensor,
    student_logprobs: Optional[torch.Tensor],
    teacher_logprobs: Optional[torch.Tensor],
    response_mask: torch.Tensor,
    lam: float,
    eps_w: float,
    has_teacher: Optional[torch.Tensor] = None,
    success_threshold: float = SUCCESS_THRESHOLD,
) -> torch.Tensor:
    """A_t [B, T] (float32) for ``method``; 0 at padding (response_mask False).

    grpo (and every method without a token weight): A_t = A.
    rlrt: eq. 7 with w_t^RLRT (eq. 6) on r = 1 rollouts, A_t = A on r = 0 rollouts.
    rlrt_all: the same weight on every rollout.  rlsd: w_t^RLSD = 1 / w_t^RLRT on every rollout.
    Rollouts without a teacher view (``has_teacher`` False) keep A_t = A. ``has_teacher`` None
    means every row has one. Log-probs are of the sampled tokens and are detached here.
    """
    spec = get_method(method)
    mask, gate = weighting_gate(method, seq_advantages, rewards, student_logprobs, teacher_logprobs, response_mask,
                                lam, eps_w, has_teacher, success_threshold)
    adv = seq_advantages.detach().to(torch.float32)[:, None].expand(mask.shape)
    if gate is not None:
        s, t = student_logprobs.detach().float(), teacher_logprobs.detach().float()
        weight = spec.token_weight(adv, s, t)
        adv = reward_gated_advantage(adv, weight, gate[:, None], lam, eps_w)
    return torch.where(mask, adv, torch.zeros_like(adv))


def weighting_gate(
    method: str,
    seq_advantages: torch.Tensor,
    rewards: torch.Tensor,
    student_logprobs: Optional[torch.Tensor],
    teacher_logprobs: Optional[torch.Tensor],
    response_mask: torch.Tensor,
    lam: float,
    eps_w: float,
    has_teacher: Optional[torch.Tensor] = None,
    success_threshold: float = SUCCESS_THRESHOLD,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Check the inputs of ``token_advantages``; return (response mask [B, T] bool, gate [B]):
    the rows whose advantage gets the token weight, or None when no row does (the method has
    no weight, or no row has a teacher view). Shared with the fused epilogue (megatron_rlrt.ops)."""
    spec = get_method(method)
    mask = _check_mask(response_mask)
    batch, length = mask.shape
    _check_shape("seq_advantages", seq_advantages, (batch,))
    _check_shape("rewards", rewards, (batch,))
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if eps_w < 0:
        raise ValueError(f"eps_w must be >= 0, got {eps_w}")
    if spec.token_weight is None:
        return mask, None
    if has_teacher is None:
        has_teacher = torch.ones(batch, dtype=torch.bool, device=mask.device)
    _check_shape("has_teacher", has_teacher, (batch,))
    has_teacher = has_teacher.bool()
    if not bool(has_teacher.any()):
        return mask, None
    if teacher_logprobs is None:
        raise ValueError(f"method {method!r} needs teacher_logprobs for the rows with has_teacher True")
    if student_logprobs is None:
        raise ValueError(f"method {method!r} needs student_logprobs")
    _check_logprobs("student_logprobs", student_logprobs, mask, (batch, length))
    _check_logprobs("teacher_logprobs", teacher_logprobs, mask & has_teacher[:, None], (batch, length))
    gate = has_teacher
    if spec.weight_on == "correct":
        gate = gate & is_correct(rewards.detach(), success_threshold)
    return mask, gate


def _check_mask(response_mask: torch.Tensor) -> torch.Tensor:
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got shape {tuple(response_mask.shape)}")
    return response_mask.bool()


def _check_shape(name: str, x: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")


def _check_logprobs(name: str, x: torch.Tensor, where: torch.Tensor, shape: tuple[int, int]) -> None:
    _check_shape(name, x, shape)
    bad = ~torch.isfinite(x.detach()) & where
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN/inf values at response positions (first at row {row}, "
            f"token {col}: {float(x[row, col])})"
        )
