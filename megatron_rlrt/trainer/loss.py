"""The RL loss of one micro-batch, and the per-sample inputs it reads.

``loss_inputs`` (last pipeline stage, once per step): the token advantages A_t of every
local sample (eq. 6-7 for the weighting methods, in one fused pass) and the log-probs the
loss compares against, as one ``SampleInputs`` per sample.

``rl_loss`` (megatron's loss function, per micro-batch): the method's loss from the policy's
log-prob columns, returned as a SUM with its normaliser count (megatron divides the
gradients by the count summed over micro-batches and data-parallel ranks), plus metrics.
slime's ``loss.py`` has the same seam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_rlrt.algorithms import (
    MethodSpec,
    PolicyLossConfig,
    distillation_token_loss,
    loss_token_mask,
    policy_token_loss,
    total_loss,
)
from megatron_rlrt.algorithms.diagnostics import credit_metric_sums
from megatron_rlrt.ops import rlrt_epilogue
from megatron_rlrt.trainer.logprobs import ColumnLayout
from megatron_rlrt.trainer.metrics import MetricSums
from megatron_rlrt.trainer.model_step import Collected, MicroBatch, student_values
from megatron_rlrt.trainer.rollout_batch import Sample, padded


@dataclass
class SampleInputs:
    """What the loss needs of one sample besides the policy's own columns ([T] per token)."""

    advantages: torch.Tensor  # A_t
    rollout_logprobs: torch.Tensor  # the rollout engine's log-probs (truncated IS)
    reward: torch.Tensor  # r in {0, 1} (0-d)
    has_teacher: bool  # a teacher row was scored for it
    old_logprobs: Optional[torch.Tensor] = None  # the policy before the step's updates (None: on-policy)
    ref_logprobs: Optional[torch.Tensor] = None  # the KL term's reference policy
    topk_ids: Optional[torch.Tensor] = None  # [T, K] the policy's top-K ids (distillation)
    teacher_topk_logprobs: Optional[torch.Tensor] = None  # [T, K] the teacher at those ids


@dataclass(frozen=True)
class RLLossConfig:
    policy: PolicyLossConfig  # clipped surrogate, TIS, entropy bonus, KL, aggregation
    distill_coef: float = 1.0
    distill_alpha: float = 0.5  # generalized JSD mix (0: forward KL, 1: reverse KL)
    distill_entropy_beta: float = 0.0  # SRPO's exp(-beta H_T) token weight


def loss_inputs(samples: Sequence[Sample], collected: Collected | None, method: MethodSpec, lam: float,
                eps_w: float, metrics: MetricSums | None) -> dict[int, SampleInputs]:
    """Token advantages and the loss inputs of each local sample, keyed by ``Sample.index``;
    credit and rollout-drift metrics into ``metrics`` (None: not reported by this rank)."""
    width = max(len(s.response_ids) for s in samples)
    mask = padded([[1.0] * len(s.response_ids) for s in samples], width).bool()
    adv = torch.tensor([s.advantage for s in samples])
    rewards = torch.tensor([1.0 if s.correct else 0.0 for s in samples])
    has_teacher = torch.tensor([s.has_teacher and collected is not None and s.index in collected.teacher_logprobs
                                for s in samples])
    s_lp = t_lp = None
    if collected is not None:
        s_lp = padded([collected.student_logprobs[s.index] for s in samples], width)
        if bool(has_teacher.any()):
            t_lp = padded([collected.teacher_logprobs[s.index] if h else [] for s, h in
                           zip(samples, has_teacher.tolist())], width)
    # eq. 6-7 in one fused pass (C++/CUDA; identical to algorithms.token_advantages)
    tok_adv = rlrt_epilogue(s_lp, t_lp, adv, rewards, mask, lam, eps_w, method.name,
                            has_teacher if method.token_weight is not None else None)
    if metrics is not None:
        correct = torch.tensor([s.correct for s in samples])
        for name, (value, weight) in credit_metric_sums(method, adv, tok_adv, correct, s_lp, t_lp, mask,
                                                        has_teacher, eps_w).items():
            metrics.add(name, value, weight)
    out = {}
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        inputs = SampleInputs(tok_adv[i, :n], torch.tensor(s.rollout_logprobs[:n]), rewards[i], bool(has_teacher[i]))
        if collected is not None:
            inputs.old_logprobs = collected.student_logprobs[s.index]
            if collected.ref_logprobs is not None:
                inputs.ref_logprobs = collected.ref_logprobs[s.index]
            if method.uses_distillation:
                inputs.topk_ids = collected.student_topk_ids[s.index]
                inputs.teacher_topk_logprobs = collected.teacher_topk_logprobs.get(s.index)
        out[s.index] = inputs
    # rollout engine vs trainer log-probs of the same tokens (drift that TIS corrects)
    if collected is not None and metrics is not None:
        diffs = torch.cat([(collected.student_logprobs[s.index] - torch.tensor(s.rollout_logprobs)).abs()
                           for s in samples])
        metrics.add("rollout/logprob_abs_diff_mean", diffs.sum().item(), float(diffs.numel()))
        metrics.add("rollout/logprob_abs_diff_max", diffs.max().item())
    return out


def rl_loss(mb: MicroBatch, cols: torch.Tensor, inputs: dict[int, SampleInputs], method: MethodSpec,
            config: RLLossConfig) -> tuple[torch.Tensor, torch.Tensor, MetricSums]:
    """(loss sum, its normaliser count, metrics) of one micro-batch of student rows."""
    values, mask = student_values(mb, cols)
    layout = ColumnLayout.of(mb.request)
    rows = [inputs[i] for i in mb.packed.student_sample_index.tolist()]
    width = mask.shape[1]
    dev = cols.device

    def stack(field: str) -> torch.Tensor:
        return padded([getattr(r, field) for r in rows], width).to(dev)

    logp = values[..., layout.logprob]
    entropy = values[..., layout.entropy] if layout.with_entropy else None
    old = stack("old_logprobs") if rows[0].old_logprobs is not None else logp.detach()
    rewards = torch.stack([r.reward for r in rows]).to(dev)
    has_teacher = torch.tensor([r.has_teacher for r in rows], device=dev)
    policy = policy_token_loss(logp, old, stack("advantages"), mask, config.policy,
                               rollout_logprobs=stack("rollout_logprobs") if config.policy.tis_cap is not None else None,
                               entropy=entropy,
                               ref_logprobs=stack("ref_logprobs") if rows[0].ref_logprobs is not None else None)
    distill = None
    if method.uses_distillation:
        k = layout.topk
        teacher_topk = torch.stack([_pad_rows(r.teacher_topk_logprobs, width, k) if r.teacher_topk_logprobs is not None
                                    else torch.zeros(width, k) for r in rows]).to(dev)
        distill = distillation_token_loss(values[..., layout.topk_logprobs], teacher_topk, alpha=config.distill_alpha,
                                          entropy_beta=config.distill_entropy_beta)
    loss, parts = total_loss(method.name, mask, rewards, pg_token_loss=None if method.loss == "distill" else policy.pg,
                             distill_token_loss=distill, has_teacher=has_teacher,
                             regularizer_token_loss=policy.regularizer, distill_coef=config.distill_coef,
                             agg_mode=config.policy.agg_mode, global_num_tokens=1.0, global_num_seqs=1.0)
    loss_mask = loss_token_mask(method.name, mask, rewards, has_teacher)
    per_seq = config.policy.agg_mode != "token-mean"
    count = (loss_mask.any(1).sum() if per_seq else loss_mask.sum()).to(torch.int)
    metrics = MetricSums()
    names = [n for n in policy.metrics if n != "num_tokens"]
    # every scalar of this micro-batch in one device->host copy (one sync on a GPU, not one per metric)
    scalars = [mask.sum(), count, parts.get("pg_loss", torch.zeros((), device=dev)),
               *(policy.metrics[n] for n in names)] + ([parts["distill_loss"]] if "distill_loss" in parts else [])
    host = torch.stack([v.detach().reshape(()).to(dev, torch.float64) for v in scalars]).tolist()
    num_tokens, n_count, pg = host[0], host[1], host[2]
    for name, v in zip(names, host[3:3 + len(names)]):
        key = f"loss/{name}" if name.startswith("pg_") else f"actor/{name}"
        if name.endswith("_max"):
            metrics.add(key, v)
        else:
            metrics.add(key, v * num_tokens, num_tokens)
    metrics.add("loss/pg", pg, n_count)
    if "distill_loss" in parts:
        metrics.add("loss/distill", host[-1], n_count)
    return loss, count, metrics


def _pad_rows(x: torch.Tensor, width: int, k: int) -> torch.Tensor:
    out = torch.zeros(width, k)
    out[: x.shape[0]] = x
    return out
