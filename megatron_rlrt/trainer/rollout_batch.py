"""One RL step's data: rollouts, rewards, advantages and teacher prompts, per sample.

Built on rank 0 (where the rollout engine and verifiers live) by ``build_rollout_batch``,
broadcast to every rank as plain Python lists (``services.on_rank0``), then split: samples ->
optimizer mini-batches (whole groups, in order) -> this data-parallel rank's share of each.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from megatron_rlrt.algorithms import MethodSpec, RewardView, build_teacher_views, get_advantage
from megatron_rlrt.config import Config
from megatron_rlrt.rollout.base import RolloutError
from megatron_rlrt.trainer.metrics import phase

if TYPE_CHECKING:
    from megatron_rlrt.trainer.services import Rank0Services


@dataclass
class Sample:
    """One rollout and everything the update needs to know about it."""

    index: int  # position in the step's batch (sample id)
    group: int  # prompt index within the step
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    reward: float
    correct: bool
    advantage: float
    teacher_prompt_ids: Optional[list[int]] = None
    # methods with a model-computed reward (MethodSpec.model_reward): the sequence the frozen
    # scorer reads; reward and advantage are set after that pass (trainer/model_reward.py)
    reward_view: Optional[RewardView] = None

    @property
    def has_teacher(self) -> bool:
        return self.teacher_prompt_ids is not None

    @property
    def student_tokens(self) -> int:
        """Tokens of the student row: prompt + response."""
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def teacher_tokens(self) -> int:
        """Tokens of the teacher row (teacher prompt + the same response), 0 without one."""
        return len(self.teacher_prompt_ids) + len(self.response_ids) if self.has_teacher else 0

    @property
    def num_tokens(self) -> int:
        """Tokens this sample puts through the model: its student row, its teacher row and
        its reward view."""
        return self.student_tokens + self.teacher_tokens + (self.reward_view.num_tokens if self.reward_view else 0)


@dataclass
class RolloutBatch:
    samples: list[Sample]
    group_size: int
    metrics: dict = field(default_factory=dict)  # rank-0 rollout/reward/teacher statistics

    def minibatches(self, samples_per_minibatch: int) -> list[list[Sample]]:
        """Consecutive whole-group mini-batches (the batch is group-ordered)."""
        return [self.samples[i : i + samples_per_minibatch]
                for i in range(0, len(self.samples), samples_per_minibatch)]


def dp_shard(samples: list[Sample], dp_rank: int, dp_size: int) -> list[Sample]:
    """This data-parallel rank's share: a balanced split by token count, deterministic on
    every rank (longest-first onto the least-loaded rank), each sample kept whole with its
    teacher row."""
    loads = [0] * dp_size
    owner = {}
    for s in sorted(samples, key=lambda s: (-s.num_tokens, s.index)):
        rank = min(range(dp_size), key=lambda r: (loads[r], r))
        loads[rank] += s.num_tokens
        owner[s.index] = rank
    return [s for s in samples if owner[s.index] == dp_rank]


def padded(values: Sequence[Sequence[float] | torch.Tensor], width: int, dtype=torch.float32) -> torch.Tensor:
    """[len(values), width] with each row's values first and zeros after (lists or 1-D tensors)."""
    out = torch.zeros((len(values), width), dtype=dtype)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.as_tensor(v, dtype=dtype)
    return out


def build_rollout_batch(services: "Rank0Services", cfg: Config, method: MethodSpec, step: int) -> RolloutBatch:
    """Rank 0: prompts -> K rollouts each -> verifier rewards -> sequence advantages (the
    method's estimator, GRPO's group advantage by default) -> teacher prompts (methods with a
    teacher) -> the step's samples and their statistics. A method with a model-computed
    reward gets its reward views instead of verifier rewards (reward and advantage 0 until
    trainer/model_reward.py sets them)."""
    k = cfg.n_samples_per_prompt
    prompts = services.loader.next_batch(cfg.rollout_batch_size)
    prompt_ids = [list(p.prompt_ids) if method.rollout_prompt is None else method.rollout_prompt(services.tokenizer, p)
                  for p in prompts]
    t0 = time.perf_counter()
    with phase("rollout", cfg.progress):
        # a fresh, reproducible seed per step (server engines derive per-request seeds from it)
        rollouts = services.engine.generate(prompt_ids, k, services.sampling(seed=cfg.seed * 7919 + step))
    services.release_engine()  # colocated: the servers free weights and KV cache for training
    t_rollout = time.perf_counter() - t0
    flat = [(g, s) for g, group in enumerate(rollouts) for s in group]
    if len(rollouts) != len(prompts) or any(len(group) != k for group in rollouts):
        raise RolloutError(f"engine returned {[len(g) for g in rollouts]} samples for {len(prompts)} prompts x {k}")
    for g, s in flat:
        if not all(math.isfinite(x) for x in s.logprobs):
            raise RolloutError(f"engine returned non-finite log-probs for prompt {prompts[g].source}")
    texts = [services.tokenizer.decode(s.response_ids, skip_special_tokens=True) for _, s in flat]
    t1 = time.perf_counter()
    reward_views: list = [None] * len(flat)
    if method.model_reward is not None:  # scored by a model after this (trainer/model_reward.py)
        reward_views = [method.model_reward.view(services.tokenizer, prompts[g], s.response_ids) for g, s in flat]
        scored = None
        correct = torch.zeros(len(flat), dtype=torch.bool)
    else:
        scored = services.reward.score(texts, [prompts[g] for g, _ in flat])
        correct = torch.tensor(scored.correct, dtype=torch.bool)
    t_score = time.perf_counter() - t1
    # r in {0, 1} as in the paper (a verifier's partial credit only enters the statistics)
    rewards = correct.float()
    adv, stats = get_advantage(method.advantage)(rewards, k, cfg.resolved_std_normalize())
    teacher_ids: list = [None] * len(flat)
    teacher_stats = None
    if method.needs_teacher:
        rho = services.exposure.rho(step, rewards.mean().item())  # ATESD: how much of c the teacher sees
        views = build_teacher_views(
            method.name, services.tokenizer, [p.messages for p in prompts], texts, rewards, k, services.teacher_cfg,
            bool(cfg.enable_thinking), zero_signal_mask=stats.zero_signal_mask if method.teacher_needs_signal else None,
            reference_solutions=[p.solution for p in prompts], reference_answers=[p.answer for p in prompts],
            response_lengths=[len(s.response_ids) for _, s in flat], generator=services.peer_generator,
            exposure=rho)
        teacher_ids, teacher_stats = views.prompt_ids, views.stats
    samples = [Sample(i, g, prompt_ids[g], s.response_ids, s.logprobs, float(rewards[i]),
                      bool(correct[i]), float(adv[i]), teacher_ids[i], reward_views[i]) for i, (g, s) in enumerate(flat)]
    empty = sum(not s.response_ids for s in samples)
    # an empty response (EOS first) has nothing to train on; it keeps its reward in the
    # group statistics and is counted in response/empty
    samples = [s for s in samples if s.response_ids]
    if cfg.dynamic_sampling:
        samples = [s for s in samples if not bool(stats.zero_signal_mask[s.index])]
    lengths = [len(s.response_ids) for _, s in flat]
    groups_with_correct = correct.view(-1, k).any(1).float().mean().item()
    metrics = {
        "response/length_mean": sum(lengths) / len(lengths), "response/length_max": float(max(lengths)),
        "response/empty": float(empty),
        "response/truncated_frac": sum(s.finish_reason == "length" for _, s in flat) / len(flat),
        "perf/rollout_time_s": t_rollout, "perf/reward_time_s": t_score,
        "perf/rollout_tokens_per_s": sum(lengths) / max(t_rollout, 1e-9),
        "data/epoch": float(services.loader.epoch),
        "perf/batch_tokens": float(sum(s.num_tokens for s in samples)),
    }
    if scored is not None:  # a model-computed reward is logged by the pass that computes it
        metrics.update({
            "reward/mean": rewards.mean().item(), "reward/raw_mean": sum(scored.rewards) / len(flat),
            "reward/pass_rate_groups": groups_with_correct,
            "reward/zero_signal_groups": float(stats.num_zero_signal_groups)})
        metrics.update({name: float(v) for name, v in scored.stats.to_metrics("reward/").items()
                        if name not in metrics})
    if teacher_stats is not None:
        metrics.update({
            "rlrt/teacher_requested": float(teacher_stats.requested), "rlrt/teacher_built": float(teacher_stats.built),
            "rlrt/teacher_coverage": teacher_stats.coverage, "rlrt/teacher_truncated": float(teacher_stats.truncated),
            "rlrt/teacher_dropped_overlong": float(teacher_stats.dropped_overlong),
            "rlrt/teacher_no_context": float(teacher_stats.no_context)})
        metrics.update(services.exposure.metrics())
    return RolloutBatch(samples, k, metrics)
