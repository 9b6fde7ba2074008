"""Diagnostics of the token-level credit (what to log to see RLRT working).

All functions are detached and reduce over response tokens (mask True) only.
``credit_metric_sums`` is what the trainer logs each step (as sums with their token counts,
so ranks' shares add up to the mean over the whole batch); the others serve analyses.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_rlrt.algorithms.distillation import add_tail_bucket, renormalize, reverse_kl
from megatron_rlrt.algorithms.methods import SUCCESS_THRESHOLD, MethodSpec, get_method, is_correct
from megatron_rlrt.algorithms.token_weights import information_asymmetry

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def positive_asymmetry_fraction(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor
) -> float:
    """Fraction of masked tokens with D_t = log P_S - log P_T > 0 (choices against the teacher,
    the tokens RLRT amplifies on correct rollouts; mask = correct rows with a teacher)."""
    mask = mask.bool()
    if not bool(mask.any()):
        return float("nan")
    return float((information_asymmetry(student_logprobs, teacher_logprobs)[mask] > 0).float().mean())


def weight_quantiles(
    weights: torch.Tensor, mask: torch.Tensor, quantiles: Sequence[float] = DEFAULT_QUANTILES
) -> dict[str, float]:
    """Quantiles (linear interpolation, as numpy) of the unclipped token weights w_t over masked
    tokens; by sorting, since torch.quantile refuses inputs over 2**24 elements."""
    values = weights.detach().double()[mask.bool()].sort().values
    out = {}
    for q in quantiles:
        key = f"q{round(q * 100):02d}"
        if values.numel() == 0:
            out[key] = float("nan")
            continue
        pos = q * (values.numel() - 1)
        lo = int(pos)
        hi = min(lo + 1, values.numel() - 1)
        out[key] = float(values[lo] + (pos - lo) * (values[hi] - values[lo]))
    return out


def weight_clip_fractions(weights: torch.Tensor, mask: torch.Tensor, eps_w: float) -> tuple[float, float]:
    """(fraction with w_t < 1 - eps_w, fraction with w_t > 1 + eps_w) over masked tokens."""
    values = weights.detach()[mask.bool()]
    if values.numel() == 0:
        return float("nan"), float("nan")
    return float((values < 1 - eps_w).float().mean()), float((values > 1 + eps_w).float().mean())


def mean_abs_advantage_shift(token_advantages: torch.Tensor, seq_advantages: torch.Tensor, mask: torch.Tensor) -> float:
    """mean |A_t - A| over masked tokens (bounded by lam * eps_w * |A| per token)."""
    mask = mask.bool()
    if not bool(mask.any()):
        return float("nan")
    shift = (token_advantages.detach() - seq_advantages.detach()[:, None]).abs()
    return float(shift[mask].float().mean())


def teacher_coverage(has_teacher: torch.Tensor, requested: torch.Tensor) -> float:
    """Fraction of the rollouts that wanted a teacher view which got one."""
    requested = requested.bool()
    if not bool(requested.any()):
        return float("nan")
    return float((has_teacher.bool() & requested).sum() / requested.sum())


def position_asymmetry(
    student_topk_logprobs: torch.Tensor, teacher_topk_logprobs: torch.Tensor, add_tail: bool = True
) -> torch.Tensor:
    """Position-level asymmetry D_bar_t = KL(P_S^t || P_T^t) (eq. 3) per position, [B, T].

    Computed on K + tail outcomes of the student's top-K support (teacher gathered at the same
    ids); a lower bound on the full-vocabulary KL, exact when K = V.
    """
    complete = add_tail_bucket if add_tail else renormalize
    s = complete(student_topk_logprobs.detach().double())
    t = complete(teacher_topk_logprobs.detach().double())
    return reverse_kl(s, t).to(student_topk_logprobs.dtype)


def credit_diagnostics(
    method: str,
    seq_advantages: torch.Tensor,
    token_advantages: torch.Tensor,
    rewards: torch.Tensor,
    student_logprobs: Optional[torch.Tensor],
    teacher_logprobs: Optional[torch.Tensor],
    response_mask: torch.Tensor,
    has_teacher: Optional[torch.Tensor],
    eps_w: float,
    requested: Optional[torch.Tensor] = None,
    success_threshold: float = SUCCESS_THRESHOLD,
) -> dict[str, float]:
    """The per-step credit metrics in one dict (keys prefixed ``credit/``)."""
    mask = response_mask.bool()
    out = {"credit/mean_abs_adv_shift": mean_abs_advantage_shift(token_advantages, seq_advantages, mask)}
    if has_teacher is not None and requested is not None:
        out["credit/teacher_coverage"] = teacher_coverage(has_teacher, requested)
    spec = get_method(method)
    if has_teacher is None or teacher_logprobs is None or student_logprobs is None:
        return out
    teacher_rows = mask & has_teacher.bool()[:, None]
    correct_rows = teacher_rows & is_correct(rewards, success_threshold)[:, None]
    out["credit/frac_pos_asym_correct"] = positive_asymmetry_fraction(student_logprobs, teacher_logprobs, correct_rows)
    if spec.token_weight is not None:
        gated = correct_rows if spec.weight_on == "correct" else teacher_rows
        gated = gated & (seq_advantages != 0)[:, None]
        weights = spec.token_weight(seq_advantages.detach()[:, None].float(), student_logprobs.float(),
                                    teacher_logprobs.float())
        out.update({f"credit/weight_{k}": v for k, v in weight_quantiles(weights, gated).items()})
        low, high = weight_clip_fractions(weights, gated, eps_w)
        out["credit/weight_clip_low"], out["credit/weight_clip_high"] = low, high
    return out


def credit_metric_sums(
    method: MethodSpec,
    seq_advantages: torch.Tensor,
    token_advantages: torch.Tensor,
    correct: torch.Tensor,
    student_logprobs: Optional[torch.Tensor],
    teacher_logprobs: Optional[torch.Tensor],
    response_mask: torch.Tensor,
    has_teacher: torch.Tensor,
    eps_w: float,
) -> dict[str, tuple[float, float]]:
    """The step's credit metrics as {name: (sum over tokens, number of tokens)}.

    rlrt/adv_abs_shift_mean (|A_t - A|) and rlrt/teacher_tokens_frac over all response tokens;
    for a weighting method, over the tokens its weight applies to (rows with a teacher, and
    correct ones for RLRT's reward gate): the clipped weight that enters eq. 7, the log of the
    raw (heavy-tailed) weight, the clip fractions, and D_t = log P_S - log P_T (eq. 4).
    teacher/mismatch: mean D_t over all teacher-row tokens, for every method with a teacher.
    """
    mask = response_mask.bool()
    n_tok = float(mask.sum())
    shift = ((token_advantages - seq_advantages[:, None]).abs() * mask).sum().item()
    out = {"rlrt/adv_abs_shift_mean": (shift, n_tok),
           "rlrt/teacher_tokens_frac": (float((mask & has_teacher[:, None]).sum()), n_tok)}
    tmask = mask & has_teacher[:, None]
    if method.needs_teacher and teacher_logprobs is not None and student_logprobs is not None and bool(tmask.any()):
        # teacher-student mismatch: mean D_t = log P_S - log P_T over every teacher-row token, a
        # sample estimate of KL(P_S || P_T) on the student's own tokens (ATESD's exposure sweep)
        d_all = information_asymmetry(student_logprobs, teacher_logprobs)
        out["teacher/mismatch"] = (d_all[tmask].sum().item(), float(tmask.sum()))
    if teacher_logprobs is None or method.token_weight is None:
        return out
    gate = has_teacher.clone()
    if method.weight_on == "correct":
        gate &= correct
    wmask = mask & gate[:, None]
    if not bool(wmask.any()):
        return out
    w = method.token_weight(seq_advantages[:, None], student_logprobs, teacher_logprobs)
    n = float(wmask.sum())
    low, high = w < 1 - eps_w, w > 1 + eps_w
    out["rlrt/weight_mean"] = (w.clamp(1 - eps_w, 1 + eps_w)[wmask].sum().item(), n)
    out["rlrt/log_weight_mean"] = (w.log()[wmask].sum().item(), n)
    out["rlrt/clip_frac_low"] = (low[wmask].float().sum().item(), n)
    out["rlrt/clip_frac_high"] = (high[wmask].float().sum().item(), n)
    out["rlrt/clip_frac"] = ((low | high)[wmask].float().sum().item(), n)
    d = information_asymmetry(student_logprobs, teacher_logprobs)
    out["rlrt/d_positive_frac"] = ((d[wmask] > 0).float().sum().item(), n)
    out["rlrt/d_mean"] = (d[wmask].sum().item(), n)
    return out
