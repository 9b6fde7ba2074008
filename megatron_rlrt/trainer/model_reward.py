"""Rewards computed by a model after generation (``MethodSpec.model_reward``; RLT's student).

After the old-policy pass, every rank scores the step's reward views (rank 0 built one per
rollout: RLT's question + explanation -> solution) under the frozen scorer weights, swapped into
the policy's model for one packed no-grad pass like the reference policy (``WeightSnapshot``).
The last pipeline stage turns the scorer's and the old policy's log-probs into a reward per
local rollout (the method's ``rewards``), all-gathers them over data-parallel ranks (a group's
rollouts may sit on different replicas), and computes the method's group advantage over the
whole batch, exactly as rank 0 does for verifier rewards. Only the last stage needs rewards and
advantages (the loss runs there); rank 0 gets the reward metrics through ``MetricSums``.

A rollout dropped on rank 0 (empty response: nothing to train on) has no reward; its slot in
its group is filled with the mean of the group's other rewards, so it does not move their
advantages' centre.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_rlrt.algorithms import MethodSpec, get_advantage
from megatron_rlrt.trainer.metrics import MetricSums
from megatron_rlrt.trainer.model_step import Collected, StepOptions, collect
from megatron_rlrt.trainer.rollout_batch import Sample
from megatron_rlrt.trainer.weight_snapshot import WeightSnapshot


def score_reward_views(chunks, samples: Sequence[Sample], scorer: WeightSnapshot, opts: StepOptions,
                       micro_batch_size: int, max_tokens: int | None) -> dict[int, torch.Tensor]:
    """{sample index: the scorer's log-probs of its view's response tokens} (last stage; empty
    elsewhere). Collective over the model-parallel ranks."""
    views = [replace(s, prompt_ids=s.reward_view.prompt_ids, response_ids=s.reward_view.response_ids,
                     teacher_prompt_ids=None, reward_view=None) for s in samples]
    with scorer.swapped_in(chunks):
        out = collect(chunks, views, replace(opts, topk=0, with_entropy=False), micro_batch_size, max_tokens)
    return out.student_logprobs


def gather_over_dp(local: dict[int, float]) -> dict[int, float]:
    """{sample index: value} of every data-parallel replica (last stage)."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() == 1:
        return dict(local)
    parts: list = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(parts, local, group=ps.get_data_parallel_group())
    return {i: v for part in parts for i, v in part.items()}


def group_filled(rewards: dict[int, float], num_rollouts: int, group_size: int) -> torch.Tensor:
    """[num_rollouts] rewards by sample index; a missing rollout gets its group's mean."""
    out = torch.full((num_rollouts,), float("nan"), dtype=torch.float32)
    for i, r in rewards.items():
        out[i] = r
    groups = out.view(-1, group_size)
    present = ~torch.isnan(groups)
    means = torch.where(present, groups, 0.0).sum(1) / present.sum(1).clamp(min=1)
    return torch.where(present, groups, means[:, None]).view(-1)


def apply_model_reward(chunks, samples: Sequence[Sample], scores: Collected | None, method: MethodSpec,
                       scorer: WeightSnapshot, opts: StepOptions, micro_batch_size: int, max_tokens: int | None,
                       cfg, metrics: MetricSums | None) -> list[Sample]:
    """``samples`` with reward and advantage from the method's model reward (last stage; the
    other stages get them back unchanged, they do not read them). ``scores``: the old-policy
    pass over ``samples``; ``metrics``: where this rank reports (None: not reported here)."""
    from megatron.core import parallel_state as ps

    view_logprobs = score_reward_views(chunks, samples, scorer, opts, micro_batch_size, max_tokens)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return list(samples)
    rewards, stats = method.model_reward.rewards([scores.student_logprobs[s.index] for s in samples],
                                                 [view_logprobs[s.index] for s in samples],
                                                 [s.reward_view for s in samples], cfg)
    k = cfg.n_samples_per_prompt
    every = gather_over_dp({s.index: float(r) for s, r in zip(samples, rewards)})
    full = group_filled(every, cfg.rollout_batch_size * k, k)
    adv, group = get_advantage(method.advantage)(full, k, cfg.resolved_std_normalize())
    if metrics is not None and ps.get_context_parallel_rank() == 0:  # each rollout once per replica
        n = float(len(samples))
        metrics.add("reward/mean", float(rewards.sum()), n)
        for name, values in stats.items():
            metrics.add(name, float(values.sum()), n)
        if ps.get_data_parallel_rank() == 0:  # batch-wide: one replica reports it
            metrics.add("reward/zero_signal_groups_total", float(group.num_zero_signal_groups))
    return [replace(s, reward=float(full[s.index]), advantage=float(adv[s.index])) for s in samples]
