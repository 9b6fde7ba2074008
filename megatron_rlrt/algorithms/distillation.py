"""Self-distillation divergences on top-K log-probs with a tail bucket (SDPO, SRPO, OPSD).

Support: following SDPO (lasgroup/SDPO, used by the RLRT authors' base code), the K entries
are the top-K tokens of the STUDENT distribution at each position; the teacher's log-probs
are gathered at those same token ids. The remaining mass of each distribution becomes one
extra "tail" bucket, log(1 - sum_k p_k), so both are proper distributions over K + 1 outcomes.
When K = V the tail is empty (probability ~0 for both) and the divergences equal their
full-vocabulary values.

alpha follows SDPO: 0 = forward KL(P_T || P_S), 1 = reverse KL(P_S || P_T), in between the
generalized Jensen-Shannon divergence with mixture M = (1 - alpha) P_S + alpha P_T.
The student's log-probs carry the gradient; the teacher's are detached.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# log of the summed top-K mass is clamped below 0 so the tail stays finite (SDPO does the same).
_MAX_LOG_TOPK_MASS = -1e-7


def add_tail_bucket(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [..., K + 1]: append log(1 - sum_k exp(l_k)) computed as log(-expm1(logsumexp))."""
    log_mass = torch.logsumexp(topk_logprobs, dim=-1, keepdim=True).clamp(max=_MAX_LOG_TOPK_MASS)
    return torch.cat([topk_logprobs, torch.log(-torch.expm1(log_mass))], dim=-1)


def renormalize(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """The top-K entries renormalised to sum to 1 (the no-tail variant)."""
    return topk_logprobs - torch.logsumexp(topk_logprobs, dim=-1, keepdim=True)


def kl_divergence(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)) over the last dim; 0 log 0 = 0."""
    p = p_logprobs.exp()
    terms = torch.where(p > 0, p * (p_logprobs - q_logprobs), torch.zeros_like(p))
    return terms.sum(dim=-1)


def forward_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_T || P_S): mass-covering (SDPO alpha = 0)."""
    return kl_divergence(teacher_logprobs, student_logprobs)


def reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_S || P_T): mode-seeking (SDPO alpha = 1)."""
    return kl_divergence(student_logprobs, teacher_logprobs)


def generalized_jsd(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """JSD_alpha = (1 - alpha) KL(P_S || M) + alpha KL(P_T || M),  M = (1 - alpha) P_S + alpha P_T."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"generalized JSD needs 0 < alpha < 1, got {alpha}")
    mixture = torch.logaddexp(student_logprobs + math.log1p(-alpha), teacher_logprobs + math.log(alpha))
    return (1.0 - alpha) * kl_divergence(student_logprobs, mixture) + alpha * kl_divergence(teacher_logprobs, mixture)


def divergence(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SDPO's alpha dial: 0 forward KL, 1 reverse KL, otherwise generalized JSD."""
    if alpha == 0.0:
        return forward_kl(student_logprobs, teacher_logprobs)
    if alpha == 1.0:
        return reverse_kl(student_logprobs, teacher_logprobs)
    return generalized_jsd(student_logprobs, teacher_logprobs, alpha)


def topk_distributions(
    student_topk_logprobs: torch.Tensor, teacher_topk_logprobs: torch.Tensor, add_tail: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both top-K log-prob sets as proper distributions (tail bucket, or renormalised), fp32+."""
    if student_topk_logprobs.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"student top-K {tuple(student_topk_logprobs.shape)} and teacher top-K "
            f"{tuple(teacher_topk_logprobs.shape)} shapes differ (gather the teacher at the student's indices)"
        )
    dtype = torch.promote_types(student_topk_logprobs.dtype, torch.float32)
    s, t = student_topk_logprobs.to(dtype), teacher_topk_logprobs.detach().to(dtype)
    complete = add_tail_bucket if add_tail else renormalize
    return complete(s), complete(t)


def topk_entropy(topk_logprobs: torch.Tensor, add_tail: bool = True) -> torch.Tensor:
    """Entropy of the (K + tail)-outcome distribution; a lower bound on the full entropy."""
    logp = add_tail_bucket(topk_logprobs) if add_tail else renormalize(topk_logprobs)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)


def srpo_entropy_weight(teacher_entropy: torch.Tensor, beta: float) -> torch.Tensor:
    """SRPO's entropy-aware weight w_t = exp(-beta * H(P_T^t)), detached.

    Source: the SRPO paper (arXiv 2604.02288) as verified by a third-party record
    (rl-llm-wiki, "entropy weighting w = exp(-beta * H), beta default 1"); we could not read
    the paper itself. Our reading: H is the TEACHER's entropy at the position ("suppress
    high-entropy, unreliable distillation targets"), unnormalised. beta = 0 disables it;
    the RLRT paper swept beta in {0, 0.5, 1}.
    """
    return torch.exp(-beta * teacher_entropy.detach())


def distillation_token_loss(
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    alpha: float = 0.5,
    add_tail: bool = True,
    entropy_beta: float = 0.0,
    teacher_entropy: Optional[torch.Tensor] = None,
    is_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token distillation loss [B, T] from [B, T, K] top-K log-probs.

    ``entropy_beta`` > 0 multiplies by SRPO's exp(-beta H_T); H_T is ``teacher_entropy`` when
    given, else the entropy of the teacher's top-K + tail distribution. ``is_weight`` (detached)
    multiplies the result: SDPO uses ``truncated_is_weight(logprobs, old_logprobs, 2.0)`` (its
    is_clip) times the rollout-correction weight ``truncated_is_weight(old, rollout, 2.0)``.
    """
    student, teacher = topk_distributions(student_topk_logprobs, teacher_topk_logprobs, add_tail)
    loss = divergence(student, teacher, alpha)
    if entropy_beta:
        if teacher_entropy is None:
            teacher_entropy = topk_entropy(teacher_topk_logprobs.detach().to(student.dtype), add_tail)
        loss = loss * srpo_entropy_weight(teacher_entropy, entropy_beta)
    if is_weight is not None:
        loss = loss * is_weight.detach()
    return loss
