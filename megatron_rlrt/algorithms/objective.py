"""The per-method training loss: which rollout trains with which per-token loss.

pg methods (grpo, grpo_eb, rlrt, rlrt_all, rlsd): the clipped surrogate on every response
token. distill methods (sdpo, opsd): the distillation loss on the rows that have a teacher
view, nothing on the others (as SDPO's self_distillation_mask). routed (srpo): distillation on
r = 0 rows with a teacher view, the surrogate on all other rows (SRPO's routing
z_distill = (1 - c_i) m_i, z_pg = 1 - z_distill).

Aggregation uses ``loss_token_mask``; for Megatron micro-batching pass
``global_num_tokens = sum of loss_token_mask(...).sum()`` over the whole mini-batch (and
``global_num_seqs`` likewise), see ``policy_loss``'s module docstring.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rlrt.algorithms.methods import SUCCESS_THRESHOLD, get_method, is_correct
from megatron_rlrt.algorithms.policy_loss import aggregate_loss


def distill_rows(
    method: str,
    rewards: torch.Tensor,
    has_teacher: Optional[torch.Tensor],
    success_threshold: float = SUCCESS_THRESHOLD,
) -> torch.Tensor:
    """bool [B]: rows trained with the distillation loss (all others: policy gradient)."""
    spec = get_method(method)
    batch = rewards.shape[0]
    if not spec.uses_distillation:
        return torch.zeros(batch, dtype=torch.bool, device=rewards.device)
    teacher = torch.zeros(batch, dtype=torch.bool, device=rewards.device) if has_teacher is None else has_teacher.bool()
    if spec.loss == "routed":
        return teacher & ~is_correct(rewards, success_threshold)
    return teacher


def loss_token_mask(
    method: str,
    response_mask: torch.Tensor,
    rewards: torch.Tensor,
    has_teacher: Optional[torch.Tensor],
    success_threshold: float = SUCCESS_THRESHOLD,
) -> torch.Tensor:
    """bool [B, T]: the tokens that enter the loss (and its normaliser)."""
    mask = response_mask.bool()
    if get_method(method).loss == "distill":
        mask = mask & distill_rows(method, rewards, has_teacher, success_threshold)[:, None]
    return mask


def total_loss(
    method: str,
    response_mask: torch.Tensor,
    rewards: torch.Tensor,
    pg_token_loss: Optional[torch.Tensor] = None,
    distill_token_loss: Optional[torch.Tensor] = None,
    has_teacher: Optional[torch.Tensor] = None,
    regularizer_token_loss: Optional[torch.Tensor] = None,
    distill_coef: float = 1.0,
    agg_mode: str = "token-mean",
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
    success_threshold: float = SUCCESS_THRESHOLD,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar loss of this (micro-)batch for ``method`` plus detached metrics.

    pg_token_loss: ``policy_token_loss(...).pg`` [B, T] (needed unless the method is pure
    distillation); distill_token_loss: ``distillation_token_loss(...)`` [B, T] (needed for
    distillation methods; rows without a teacher may hold anything finite);
    regularizer_token_loss: ``policy_token_loss(...).regularizer``, added on every loss token.
    """
    spec = get_method(method)
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got shape {tuple(response_mask.shape)}")
    if rewards.shape != response_mask.shape[:1]:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}, expected ({response_mask.shape[0]},)")
    for name, x in (("pg_token_loss", pg_token_loss), ("distill_token_loss", distill_token_loss),
                    ("regularizer_token_loss", regularizer_token_loss)):
        if x is not None and x.shape != response_mask.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(response_mask.shape)}")
    if spec.loss != "distill" and pg_token_loss is None:
        raise ValueError(f"method {method!r} needs pg_token_loss")
    if spec.uses_distillation and distill_token_loss is None:
        raise ValueError(f"method {method!r} needs distill_token_loss")

    distill = distill_rows(method, rewards, has_teacher, success_threshold)[:, None]
    mask = loss_token_mask(method, response_mask, rewards, has_teacher, success_threshold)
    zeros = torch.zeros(response_mask.shape, device=response_mask.device)
    pg = zeros if pg_token_loss is None else pg_token_loss
    per_token = pg if distill_token_loss is None else torch.where(distill, distill_coef * distill_token_loss, pg)
    if regularizer_token_loss is not None:
        per_token = per_token + regularizer_token_loss

    def agg(x: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(x, mask, agg_mode, global_num_tokens, global_num_seqs)

    loss = agg(per_token)
    metrics = {"loss": loss.detach(), "distill_row_frac": distill.float().mean().detach()}
    if spec.uses_distillation:
        metrics["distill_loss"] = agg(torch.where(distill, distill_token_loss, zeros)).detach()
    if spec.loss != "distill":
        metrics["pg_loss"] = agg(torch.where(distill, zeros, pg)).detach()
    return loss, metrics
