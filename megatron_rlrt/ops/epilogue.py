"""The RLRT epilogue: token advantages from the student and teacher log-probs of one packed forward.

Same results as ``megatron_rlrt.algorithms.token_advantages`` (which stays the definition): for
the weighting methods (rlrt, rlrt_all, rlsd) the eq. 6-7 arithmetic runs in the extension's kernel
(CPU or CUDA), in the same operation order and float32 rounding; every other method, and the torch
backend, calls ``token_advantages`` itself.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rlrt.algorithms.methods import SUCCESS_THRESHOLD, get_method, is_correct
from megatron_rlrt.algorithms.token_advantages import _check_logprobs, _check_mask, _check_shape, token_advantages
from megatron_rlrt.algorithms.token_weights import rlrt_weight, rlsd_weight
from megatron_rlrt.ops import dispatch as _backend
from megatron_rlrt.ops import reference

# token weight function -> whether the kernel inverts the ratio (RLSD's weight is 1 / RLRT's)
_KERNEL_WEIGHTS = {rlrt_weight: False, rlsd_weight: True}


def rlrt_epilogue(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    seq_advantages: torch.Tensor,
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    lam: float,
    eps_w: float,
    method: str,
    has_teacher: Optional[torch.Tensor] = None,
    success_threshold: float = SUCCESS_THRESHOLD,
) -> torch.Tensor:
    """Token advantages A_t [B, T] float32 (0 at padding) for ``method`` (rlrt, rlrt_all, rlsd, grpo, ...).

    Arguments as ``megatron_rlrt.algorithms.token_advantages``; log-probs are detached.
    """
    spec = get_method(method)
    kernels = _backend.kernels_for(student_logprobs) if student_logprobs is not None else reference
    inverse = _KERNEL_WEIGHTS.get(spec.token_weight)
    if kernels is reference or inverse is None or (has_teacher is not None and not bool(has_teacher.any())):
        return token_advantages(method, seq_advantages, rewards, student_logprobs, teacher_logprobs,
                                response_mask, lam, eps_w, has_teacher, success_threshold)
    mask = _check_mask(response_mask)
    batch, length = mask.shape
    _check_shape("seq_advantages", seq_advantages, (batch,))
    _check_shape("rewards", rewards, (batch,))
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if eps_w < 0:
        raise ValueError(f"eps_w must be >= 0, got {eps_w}")
    if has_teacher is None:
        has_teacher = torch.ones(batch, dtype=torch.bool, device=mask.device)
    _check_shape("has_teacher", has_teacher, (batch,))
    has_teacher = has_teacher.bool()
    if teacher_logprobs is None:
        raise ValueError(f"method {method!r} needs teacher_logprobs for the rows with has_teacher True")
    _check_logprobs("student_logprobs", student_logprobs, mask, (batch, length))
    _check_logprobs("teacher_logprobs", teacher_logprobs, mask & has_teacher[:, None], (batch, length))
    gate = has_teacher
    if spec.weight_on == "correct":
        gate = gate & is_correct(rewards.detach(), success_threshold)
    return kernels.epilogue(student_logprobs.detach(), teacher_logprobs.detach(), seq_advantages.detach(),
                            gate, mask, float(lam), float(eps_w), inverse)
