"""PPO clipped surrogate (DAPO recipe) with truncated IS, entropy bonus and reference KL.

Micro-batch normalisation
-------------------------
Megatron sums the losses returned for the micro-batches of one mini-batch (and, across
data-parallel ranks, sums or averages their gradients). ``aggregate_loss`` therefore divides
by *mini-batch* counts when they are given:

* token-mean:          sum_{i,t} m_it L_it / global_num_tokens
* seq-mean-token-mean: sum_i (sum_t m_it L_it / n_i) / global_num_seqs
* seq-mean-token-sum:  sum_i (sum_t m_it L_it) / global_num_seqs

where ``global_num_tokens`` is the number of loss tokens (mask True) in the whole mini-batch
(every micro-batch on every DP rank) and ``global_num_seqs`` the number of sequences with at
least one loss token. Summing the returned values over all micro-batches and ranks then
gives exactly the loss of the whole mini-batch at once. If the DP gradient reduction
averages instead of sums, multiply the loss by the DP size (verl does the same). Without the
global counts, the local counts are used (the micro-batch is the whole mini-batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_TYPES = ("k1", "k3")
_LOG_RATIO_LIMIT = 20.0  # exp(+-20) keeps ratios finite; the clip makes larger values moot


@dataclass(frozen=True)
class PolicyLossConfig:
    """Defaults: paper Table 5 (DAPO clip-higher, token-level aggregation, rollout IS cap 2,
    no KL) with verl's dual-clip constant 3. ``None`` disables dual clip / truncated IS."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip_c: Optional[float] = 3.0
    agg_mode: str = "token-mean"
    tis_cap: Optional[float] = 2.0
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_type: str = "k3"

    def __post_init__(self) -> None:
        if self.agg_mode not in AGG_MODES:
            raise ValueError(f"unknown agg_mode {self.agg_mode!r}; valid: {list(AGG_MODES)}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"unknown kl_type {self.kl_type!r}; valid: {list(KL_TYPES)}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0, got {self.tis_cap}")


@dataclass
class PolicyTokenLoss:
    """Per-token pieces [B, T]: the IS-weighted clipped surrogate and the regulariser
    (-entropy_coef * H + kl_coef * KL_ref); the total per-token loss is their sum."""

    pg: torch.Tensor
    regularizer: torch.Tensor
    metrics: dict[str, torch.Tensor]


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar; see the module docstring for the counts."""
    if loss_mat.shape != mask.shape:
        raise ValueError(f"loss {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} shapes differ")
    m = mask.bool()
    masked = torch.where(m, loss_mat, torch.zeros_like(loss_mat))
    if mode == "token-mean":
        denom = m.sum() if global_num_tokens is None else global_num_tokens
        return masked.sum() / _at_least_one(denom)
    tokens_per_seq = m.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        seq_losses = masked.sum(dim=-1) / tokens_per_seq.clamp(min=1)
    elif mode == "seq-mean-token-sum":
        seq_losses = masked.sum(dim=-1)
    else:
        raise ValueError(f"unknown agg_mode {mode!r}; valid: {list(AGG_MODES)}")
    denom = (tokens_per_seq > 0).sum() if global_num_seqs is None else global_num_seqs
    return seq_losses.sum() / _at_least_one(denom)


def truncated_is_weight(
    numerator_logprobs: torch.Tensor, denominator_logprobs: torch.Tensor, cap: Optional[float]
) -> Optional[torch.Tensor]:
    """min(exp(num - den), cap), detached; None when ``cap`` is None.

    Rollout correction (TIS): num = old (trainer) log-probs, den = rollout-engine log-probs.
    """
    if cap is None:
        return None
    log_ratio = (numerator_logprobs.detach() - denominator_logprobs.detach()).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    return torch.exp(log_ratio).clamp(max=cap)


def ppo_clip_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: Optional[float] = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = pi / pi_old; with
    dual clip, for A < 0 the loss is further capped at -c A (i.e. rho > c stops the gradient).

    Returns the loss and bool masks of where each clip branch decides the loss.
    """
    adv = advantages.detach()
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    branch = {
        "clip_low": (adv < 0) & (ratio < 1.0 - eps_low),
        "clip_high": (adv > 0) & (ratio > 1.0 + eps_high),
        "clip_dual": torch.zeros_like(adv, dtype=torch.bool),
    }
    if dual_clip_c is not None:
        dual = -adv * dual_clip_c
        branch["clip_dual"] = (adv < 0) & (loss > dual)
        loss = torch.where(adv < 0, torch.minimum(loss, dual), loss)
    return loss, branch


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate at the sampled tokens: k1 = log pi - log pi_ref,
    k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (Schulman's low-variance one)."""
    diff = ref_logprobs.detach() - logprobs
    if kind == "k1":
        return -diff
    if kind == "k3":
        diff = diff.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
        return torch.exp(diff) - diff - 1.0
    raise ValueError(f"unknown kl_type {kind!r}; valid: {list(KL_TYPES)}")


def policy_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig = PolicyLossConfig(),
    rollout_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
) -> PolicyTokenLoss:
    """The per-token policy loss pieces and detached metrics (means over response tokens).

    ``advantages`` are the per-token A_t [B, T]; ``entropy`` the per-token policy entropy (with
    grad, for the bonus); ``rollout_logprobs`` the inference engine's log-probs for TIS.
    """
    shape = tuple(response_mask.shape)
    for name, x in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages),
                    ("rollout_logprobs", rollout_logprobs), ("entropy", entropy), ("ref_logprobs", ref_logprobs)):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape} (response_mask)")
    mask = response_mask.bool()

    pg, branch = ppo_clip_token_loss(
        logprobs, old_logprobs, advantages, config.eps_low, config.eps_high, config.dual_clip_c
    )
    metrics = {f"pg_clipfrac_{k[5:]}": _masked_mean(v.float(), mask) for k, v in branch.items()}
    metrics["ppo_kl"] = _masked_mean(old_logprobs.detach() - logprobs.detach(), mask)
    metrics["num_tokens"] = mask.sum().detach().float()

    if rollout_logprobs is not None and config.tis_cap is not None:
        tis = truncated_is_weight(old_logprobs, rollout_logprobs, config.tis_cap)
        pg = pg * tis
        capped = (old_logprobs.detach() - rollout_logprobs.detach()) > math.log(config.tis_cap)
        metrics["tis_weight_mean"] = _masked_mean(tis, mask)
        metrics["tis_weight_max"] = _masked_max(tis, mask)
        metrics["tis_clipped_frac"] = _masked_mean(capped.float(), mask)

    regularizer = torch.zeros_like(pg)
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy.detach(), mask)
        if config.entropy_coef:
            regularizer = regularizer - config.entropy_coef * entropy
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, config.kl_type)
        metrics["ref_kl"] = _masked_mean(kl.detach(), mask)
        if config.kl_coef:
            regularizer = regularizer + config.kl_coef * kl
    return PolicyTokenLoss(pg=pg, regularizer=regularizer, metrics=metrics)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig = PolicyLossConfig(),
    rollout_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar loss of this (micro-)batch and detached metrics; see the module docstring."""
    pieces = policy_token_loss(logprobs, old_logprobs, advantages, response_mask, config,
                               rollout_logprobs, entropy, ref_logprobs)

    def agg(x: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(x, response_mask, config.agg_mode, global_num_tokens, global_num_seqs)

    loss = agg(pieces.pg + pieces.regularizer)
    metrics = dict(pieces.metrics)
    metrics["pg_loss"] = agg(pieces.pg).detach()
    return loss, metrics


def _at_least_one(x) -> torch.Tensor | float:
    return x.clamp(min=1) if isinstance(x, torch.Tensor) else max(float(x), 1.0)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = _metric(x)
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = _metric(x)
    if not bool(mask.any()):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x[mask].max()


def _metric(x: torch.Tensor) -> torch.Tensor:
    """Detached, at least fp32 (bf16 means are too coarse to log)."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))
