"""The RLRT epilogue: token advantages from the student and teacher log-probs of one packed forward.

Same results as ``megatron_rlrt.algorithms.token_advantages`` (which stays the definition): for
the weighting methods (rlrt, rlrt_all, rlsd) the eq. 6-7 arithmetic runs in the extension's kernel
(CPU or CUDA), in the same operation order and float32 rounding; every other method, and the torch
backend, calls ``token_advantages`` itself.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rlrt.algorithms.methods import SUCCESS_THRESHOLD, get_method
from megatron_rlrt.algorithms.token_advantages import token_advantages, weighting_gate
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
    args = (method, seq_advantages, rewards, student_logprobs, teacher_logprobs, response_mask, lam, eps_w,
            has_teacher, success_threshold)
    kernels = _backend.kernels_for(student_logprobs) if student_logprobs is not None else reference
    inverse = _KERNEL_WEIGHTS.get(get_method(method).token_weight)
    if kernels is reference or inverse is None:
        return token_advantages(*args)
    mask, gate = weighting_gate(*args)
    if gate is None:  # no row is weighted: A_t = A
        return token_advantages(*args)
    return kernels.epilogue(student_logprobs.detach(), teacher_logprobs.detach(), seq_advantages.detach(),
                            gate, mask, float(lam), float(eps_w), inverse)
