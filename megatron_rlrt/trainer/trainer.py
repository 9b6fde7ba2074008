"""The RL training loop on megatron-core.

One RL step (``Trainer.step``), as data:

    prompts -> rollout engine (K samples each, sampler log-probs)           rank 0
            -> verifier rewards -> group advantages A                       rank 0
            -> teacher views (RLRT: correct rollouts of groups with A != 0)  rank 0
            -> broadcast; split into optimizer mini-batches and DP shards    all ranks
            -> ONE packed forward: log P_S(y_t) and log P_T(y_t)             model_step.collect
            -> token advantages A_t (eq. 6-7 for RLRT)                       last pipeline stage
            -> PPO/GRPO update per mini-batch (pipeline schedule, DDP, Adam) model_step.train_minibatch
            -> weights -> rollout engine (same HF-name mapping as tools/)    rollout.weight_sync
            -> metrics, checkpoint

Everything distributed is megatron's own (parallel_state, DDP, optimizer, schedules,
dist_checkpointing); the algorithm is the pure functions in ``megatron_rlrt.algorithms``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import replace
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_rlrt import parallel
from megatron_rlrt.algorithms import (
    PolicyLossConfig,
    TeacherConfig,
    build_teacher_views,
    distillation_token_loss,
    get_method,
    group_advantages,
    information_asymmetry,
    loss_token_mask,
    make_lambda_schedule,
    policy_token_loss,
    total_loss,
)
from megatron_rlrt.config import Config
from megatron_rlrt.eval.metrics import summarize
from megatron_rlrt.models.megatron_checkpoint import (
    METADATA,
    load_hf_into_model,
    load_model_checkpoint,
    spec_of_checkpoint,
)
from megatron_rlrt.models.hf_checkpoint import load_hf_weights
from megatron_rlrt.models.qwen3 import CheckpointError, Qwen3Spec, build_model, transformer_config
from megatron_rlrt.ops import rlrt_epilogue
from megatron_rlrt.rollout.base import RolloutError, SamplingParams
from megatron_rlrt.rollout.fleet import RolloutFleet
from megatron_rlrt.rollout.registry import create_engine
from megatron_rlrt.trainer import checkpoint as ckpt
from megatron_rlrt.trainer import run_dir
from megatron_rlrt.trainer.metrics import MetricsWriter, console_line, phase, reduce_to_rank0
from megatron_rlrt.trainer.model_step import StepOptions, collect, student_values, train_minibatch
from megatron_rlrt.trainer.rollout_batch import RolloutBatch, Sample, dp_shard, padded
from megatron_rlrt.trainer.weight_snapshot import WeightSnapshot

logger = logging.getLogger("megatron_rlrt")

_CONTEXT = {"peer": "peer", "reference": "reference_solution", "answer": "reference_answer"}


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.platform = parallel.initialize(cfg.layout, seed=cfg.seed)
        cfg.validate(world_size=dist.get_world_size())
        from megatron.core import parallel_state as ps

        self.ps = ps
        self.rank0 = dist.get_rank() == 0
        self.method = get_method(cfg.advantage_estimator)
        self.hf_dir = cfg.hf_checkpoint or os.path.join(cfg.load, "hf")
        self.spec = spec_of_checkpoint(cfg.load) if cfg.load else Qwen3Spec.from_hf_dir(self.hf_dir)
        self.spec.check_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                                 cfg.virtual_pipeline_model_parallel_size)
        self._build_model()
        # the weights the run starts from (HF or --load), before any resume: the reference
        # policy of the KL term (unless --ref-load) and the --teacher-weights initial teacher
        self.initial_weights = WeightSnapshot.of(self.chunks) if self._needs_initial_weights() else None
        self.reference = self._reference_weights()
        self.lam_schedule = make_lambda_schedule(cfg.rlrt_lambda, cfg.rlrt_lambda_decay_steps)
        self.loss_cfg = PolicyLossConfig(cfg.eps_clip, cfg.eps_clip_high, cfg.eps_clip_c or None, cfg.loss_agg_mode,
                                         cfg.tis_clip or None, cfg.entropy_coef, cfg.kl_coef, cfg.kl_type)
        self.opts = StepOptions(temperature=cfg.rollout_temperature, with_entropy=True,
                                topk=cfg.distill_topk if self.method.uses_distillation else 0,
                                use_te=self.platform.has_transformer_engine,
                                pad_to_multiple_of=cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1,
                                sequence_parallel_size=cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1)
        self.start_step, rng = self._restore()
        self.teacher = self._init_teacher()
        self._on_rank0(lambda: self._build_rank0_services(rng), "loading data and verifier")
        # the rollout servers of every node (collective); rank 0 generates through fleet.engine
        self.fleet = RolloutFleet.create(cfg, self.hf_dir, getattr(self, "tokenizer", None), create_engine)
        self.engine = self.fleet.engine
        self._on_rank0(lambda: self._attach_engine(rng), "setting up the rollout engine")
        self.metrics = MetricsWriter(cfg.save, cfg.tensorboard, cfg.wandb_project, cfg.to_dict(), self.start_step)
        self._sync_engine(version=self.start_step)

    # -- setup -------------------------------------------------------------------------------

    def _build_model(self):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        self.tconfig = transformer_config(
            self.spec, tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
            context_parallel_size=cfg.context_parallel_size, sequence_parallel=cfg.sequence_parallel,
            params_dtype=dtype, perform_initialization=False, **cfg.recompute_options(),
            calculate_per_token_loss=True,  # we return loss sums + counts; megatron divides grads once
        )
        chunks = build_model(self.spec, self.tconfig)
        if cfg.load:
            load_model_checkpoint(chunks, cfg.load)
        else:
            load_hf_into_model(chunks, self.spec, load_hf_weights(self.hf_dir, self.spec))
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=cfg.use_distributed_optimizer)
        self.chunks = [DistributedDataParallel(config=self.tconfig, ddp_config=ddp_config, module=c) for c in chunks]
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad, bf16=cfg.bf16,
            params_dtype=dtype, use_distributed_optimizer=cfg.use_distributed_optimizer), self.chunks)
        total = max(1, cfg.train_iters * cfg.optimizer_steps_per_rl_step)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if cfg.lr_warmup_iters else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=min(cfg.lr_warmup_iters, total - 1), lr_decay_steps=total,
            lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
            wd_incr_steps=total, wd_incr_style="constant")

    def _restore(self):
        path = run_dir.prepare(self.cfg, log=self._log)  # resume, --overwrite, --no-auto-resume, or refuse
        self.resumed_from = path
        if path is None:
            self.loader_state = None
            return 0, None
        state, rng = ckpt.load_checkpoint(path, self.chunks, self.optimizer, self.scheduler, log=self._log)
        self.loader_state = state.get("loader")
        self._log(f"resumed from {path} (step {state['step']})")
        return int(state["step"]), rng

    def _needs_initial_weights(self) -> bool:
        """The reference policy (without --ref-load) and the 'initial' teacher are the starting
        weights; an EMA teacher starts from them too, but only a fresh run needs them (a resumed
        one loads it)."""
        return (self.cfg.kl_coef > 0 and not self.cfg.ref_load) or (
            self.method.needs_teacher and self.cfg.teacher_weights == "initial")

    def _reference_weights(self) -> WeightSnapshot | None:
        """The KL term's reference policy: the starting weights, or --ref-load (a megatron-rlrt
        checkpoint or a HF directory of the same architecture) read into this rank's shards."""
        path = self.cfg.ref_load
        if self.cfg.kl_coef <= 0:
            return None
        if not path:
            return self.initial_weights
        if os.path.isfile(os.path.join(path, METADATA)):
            ref_spec = spec_of_checkpoint(path)
            load = lambda: load_model_checkpoint(self.chunks, path)  # noqa: E731
        elif os.path.isfile(os.path.join(path, "config.json")):
            ref_spec = Qwen3Spec.from_hf_dir(path)
            load = lambda: load_hf_into_model(self.chunks, self.spec, load_hf_weights(path, self.spec))  # noqa: E731
        else:
            raise CheckpointError(f"--ref-load {path}: neither a megatron-rlrt checkpoint ({METADATA}) nor a "
                                  "Hugging Face model directory (config.json)")
        differ = {f: (getattr(ref_spec, f), getattr(self.spec, f)) for f in vars(self.spec)
                  if f != "dtype" and getattr(ref_spec, f) != getattr(self.spec, f)}
        if differ:
            raise CheckpointError(f"--ref-load {path}: another architecture than the policy's "
                                  f"(field: (reference, policy)): {differ}")
        self._log(f"reference policy of the KL term: {path}")
        return WeightSnapshot.loaded_by(self.chunks, load)

    def _init_teacher(self) -> WeightSnapshot | None:
        """Teacher weights for --teacher-weights initial|ema (None: the current policy, eq. 1)."""
        cfg = self.cfg
        if cfg.teacher_weights == "current" or not self.method.needs_teacher:
            return None
        if cfg.teacher_weights == "initial":
            return self.initial_weights
        if self.resumed_from is None:  # a fresh run: the model holds the starting weights
            return WeightSnapshot.of(self.chunks)
        ema_dir = os.path.join(self.resumed_from, ckpt.TEACHER_EMA_DIR)
        if not os.path.isdir(ema_dir):
            raise CheckpointError(f"--teacher-weights ema: the checkpoint {self.resumed_from} has no "
                                  f"{ckpt.TEACHER_EMA_DIR}/ (it was saved by a run with another teacher); resume "
                                  "with the same --teacher-weights")
        return WeightSnapshot.load(self.chunks, ema_dir)

    def _build_rank0_services(self, rng):
        from megatron_rlrt.data import DataConfig, PromptDataset, PromptLoader, TemplateConfig
        from megatron_rlrt.reward import get_reward
        from megatron_rlrt.tokenizer import load_tokenizer

        cfg = self.cfg
        self.tokenizer = load_tokenizer(self.hf_dir)
        template = TemplateConfig(apply_chat_template=cfg.apply_chat_template, enable_thinking=cfg.enable_thinking,
                                  system_prompt=cfg.system_prompt, instruction=cfg.instruction)
        data_cfg = DataConfig(path=cfg.prompt_data, prompt_key=cfg.input_key, answer_key=cfg.label_key,
                              solution_key=cfg.solution_key, max_prompt_length=cfg.rollout_max_prompt_len,
                              template=template)
        self.dataset = PromptDataset.from_config(data_cfg, self.tokenizer)
        if len(self.dataset) == 0:
            raise ValueError(f"--prompt-data {cfg.prompt_data}: no usable prompts ({self.dataset.stats})")
        self.loader = PromptLoader(self.dataset, seed=cfg.seed)
        if self.loader_state:
            self.loader.load_state_dict(self.loader_state)
        self.eval_set = None
        if cfg.eval_data:
            self.eval_set = list(PromptDataset.from_config(replace(data_cfg, path=cfg.eval_data), self.tokenizer))
            self.eval_set = self.eval_set[: cfg.eval_max_prompts] if cfg.eval_max_prompts else self.eval_set
        self.reward = get_reward(cfg.reward, timeout_s=cfg.reward_timeout, num_workers=cfg.reward_workers,
                                 progress=cfg.progress)
        self.teacher_cfg = TeacherConfig(context=_CONTEXT[cfg.resolved_teacher_context()],
                                         peer_choice=cfg.teacher_peer_choice, strip_thinking=cfg.teacher_strip_thinking,
                                         max_teacher_prompt_len=cfg.teacher_max_prompt_len, weights=cfg.teacher_weights,
                                         ema_rate=cfg.teacher_ema_rate)
        self.peer_generator = torch.Generator().manual_seed(cfg.seed + 17)
        if rng and "peer_generator" in rng:
            self.peer_generator.set_state(rng["peer_generator"])
        self.enable_thinking = cfg.enable_thinking

    def _attach_engine(self, rng):
        if rng and "rollout_generator" in rng and hasattr(self.engine, "generator"):
            self.engine.generator.set_state(rng["rollout_generator"])
        self.eos_ids = list(getattr(self.engine, "eos_token_ids", [self.tokenizer.eos_token_id]))

    # -- helpers -----------------------------------------------------------------------------

    def _on_rank0(self, fn, what: str):
        """Run ``fn`` on rank 0 and broadcast its result; if it raises, every rank raises
        (instead of the other ranks waiting forever in their next collective)."""
        result, error = None, None
        if self.rank0:
            try:
                result = fn()
            except Exception as exc:  # re-raised below, on every rank
                error = exc
        holder = [(result, None if error is None else f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(holder, src=0)
        if error is not None:
            raise error
        if holder[0][1] is not None:
            raise RuntimeError(f"rank 0 failed while {what}: {holder[0][1]}")
        return holder[0][0]

    def _log(self, msg: str) -> None:
        if self.rank0:
            print(f"[megatron-rlrt] {msg}", flush=True)

    @property
    def is_last_stage(self) -> bool:
        return self.ps.is_pipeline_last_stage(ignore_virtual=True)

    def _sampling(self, temperature: float | None = None, seed: int | None = None) -> SamplingParams:
        cfg = self.cfg
        return SamplingParams(max_new_tokens=cfg.rollout_max_response_len,
                              temperature=temperature or cfg.rollout_temperature, top_p=cfg.rollout_top_p,
                              top_k=cfg.rollout_top_k, stop_token_ids=tuple(self.eos_ids), seed=seed)

    def _sync_engine(self, version: int) -> float:
        """Collective: the servers take their weights back, load ``version``, take their KV cache."""
        return self.fleet.refresh(self.chunks, self.spec, version)

    # -- rank 0: rollout, reward, advantages, teacher views ----------------------------------

    def _make_batch(self, step: int = 0) -> RolloutBatch:
        cfg, k = self.cfg, self.cfg.n_samples_per_prompt
        prompts = self.loader.next_batch(cfg.rollout_batch_size)
        t0 = time.perf_counter()
        with phase("rollout", cfg.progress):
            # a fresh, reproducible seed per step (server engines derive per-request seeds from it)
            rollouts = self.engine.generate([p.prompt_ids for p in prompts], k,
                                            self._sampling(seed=cfg.seed * 7919 + step))
        self.fleet.release()  # colocated: the servers free weights and KV cache for training
        t_rollout = time.perf_counter() - t0
        flat = [(g, s) for g, group in enumerate(rollouts) for s in group]
        if len(rollouts) != len(prompts) or any(len(group) != k for group in rollouts):
            raise RolloutError(f"engine returned {[len(g) for g in rollouts]} samples for {len(prompts)} prompts x {k}")
        for g, s in flat:
            if not all(math.isfinite(x) for x in s.logprobs):
                raise RolloutError(f"engine returned non-finite log-probs for prompt {prompts[g].source}")
        texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for _, s in flat]
        t1 = time.perf_counter()
        scored = self.reward.score(texts, [prompts[g] for g, _ in flat])
        t_score = time.perf_counter() - t1
        correct = torch.tensor(scored.correct, dtype=torch.bool)
        # r in {0, 1} as in the paper (a verifier's partial credit only enters the statistics)
        rewards = correct.float()
        adv, stats = group_advantages(rewards, k, cfg.resolved_std_normalize())
        teacher_ids: list = [None] * len(flat)
        tstats = None
        if self.method.needs_teacher:
            views = build_teacher_views(
                cfg.advantage_estimator, self.tokenizer, [p.messages for p in prompts], texts, rewards, k, self.teacher_cfg, bool(self.enable_thinking),
                zero_signal_mask=stats.zero_signal_mask if self.method.teacher_needs_signal else None,
                reference_solutions=[p.solution for p in prompts], reference_answers=[p.answer for p in prompts],
                response_lengths=[len(s.response_ids) for _, s in flat], generator=self.peer_generator)
            teacher_ids, tstats = views.prompt_ids, views.stats
        samples = [Sample(i, g, list(prompts[g].prompt_ids), s.response_ids, s.logprobs, float(rewards[i]),
                          bool(correct[i]), float(adv[i]), teacher_ids[i]) for i, (g, s) in enumerate(flat)]
        empty = sum(not s.response_ids for s in samples)
        # an empty response (EOS first) has nothing to train on; it keeps its reward in the
        # group statistics and is counted in response/empty
        samples = [s for s in samples if s.response_ids]
        if cfg.dynamic_sampling:
            samples = [s for s in samples if not bool(stats.zero_signal_mask[s.index])]
        lengths = [len(s.response_ids) for _, s in flat]
        groups_with_correct = correct.view(-1, k).any(1).float().mean().item()
        m = {"reward/mean": rewards.mean().item(), "reward/raw_mean": sum(scored.rewards) / len(flat),
             "reward/pass_rate_groups": groups_with_correct,
             "reward/zero_signal_groups": float(stats.num_zero_signal_groups),
             "response/length_mean": sum(lengths) / len(lengths), "response/length_max": float(max(lengths)),
             "response/empty": float(empty),
             "response/truncated_frac": sum(s.finish_reason == "length" for _, s in flat) / len(flat),
             "perf/rollout_time_s": t_rollout, "perf/reward_time_s": t_score,
             "perf/rollout_tokens_per_s": sum(lengths) / max(t_rollout, 1e-9),
             "data/epoch": float(self.loader.epoch),
             "perf/batch_tokens": float(sum(len(s.prompt_ids) + len(s.response_ids) + len(s.teacher_prompt_ids or [])
                                            + (len(s.response_ids) if s.has_teacher else 0) for s in samples))}
        m.update({k2: float(v) for k2, v in scored.stats.to_metrics("reward/").items() if k2 not in m})
        if tstats is not None:
            m.update({"rlrt/teacher_requested": float(tstats.requested), "rlrt/teacher_built": float(tstats.built),
                      "rlrt/teacher_coverage": tstats.coverage, "rlrt/teacher_truncated": float(tstats.truncated),
                      "rlrt/teacher_dropped_overlong": float(tstats.dropped_overlong),
                      "rlrt/teacher_no_context": float(tstats.no_context)})
        return RolloutBatch(samples, k, m)

    # -- one RL step -------------------------------------------------------------------------

    def step(self, step: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        lam = self.lam_schedule.value(step)
        batch = self._on_rank0(lambda: self._make_batch(step), f"making the rollout batch of step {step + 1}")
        dp_rank = self.ps.get_data_parallel_rank()
        dp_size = self.ps.get_data_parallel_world_size()
        per_mb = len(batch.samples) if cfg.dynamic_sampling else (cfg.global_batch_size or len(batch.samples))
        minibatches = [dp_shard(mb, dp_rank, dp_size) for mb in batch.minibatches(per_mb)]
        if any(len(mb) == 0 for mb in minibatches) or not batch.samples:
            self._log(f"step {step}: no trainable samples on some rank (dynamic sampling or empty responses); "
                      "skipping the update")
            return {**batch.metrics, "perf/step_time_s": time.perf_counter() - t0, "train/skipped": 1.0}
        local = [s for mb in minibatches for s in mb]
        t_train = time.perf_counter()
        need_collect = (self.method.needs_teacher or len(minibatches) > 1 or self.method.uses_distillation
                        or self.reference is not None)
        pieces: dict[str, tuple[float, float]] = {}
        collected = None
        if need_collect:
            with phase("log-probs", cfg.progress and self.rank0):
                collected = self._collect(local)
        t_collect = time.perf_counter()
        per_sample = self._per_sample_inputs(local, collected, lam, pieces) if self.is_last_stage else {}
        grad_norms = []
        with phase("update", cfg.progress and self.rank0):
            for mb in minibatches:
                grad_norms.append(self._update(mb, per_sample, pieces))
        t_sync = time.perf_counter()
        pieces["perf/logprob_time_s_max"] = (t_collect - t_train, 1.0)
        pieces["perf/update_time_s_max"] = (t_sync - t_collect, 1.0)
        if (self.ps.get_tensor_model_parallel_rank() == 0 and self.ps.get_pipeline_model_parallel_rank() == 0
                and self.ps.get_context_parallel_rank() == 0):
            # one contribution per data-parallel replica, summed over replicas
            pieces["perf/student_tokens_total"] = (float(sum(len(s.prompt_ids) + len(s.response_ids) for s in local)), 1.0)
            pieces["perf/teacher_tokens_total"] = (float(sum(len(s.teacher_prompt_ids) + len(s.response_ids)
                                                             for s in local if s.has_teacher)), 1.0)
        sync_s = self._sync_engine(version=step + 1)
        if self.teacher is not None and cfg.teacher_weights == "ema":
            self.teacher.ema_update(self.chunks, cfg.teacher_ema_rate)
        m = reduce_to_rank0(pieces)
        if self.rank0:
            step_time = time.perf_counter() - t0
            train_time = t_sync - t_train
            m.update(batch.metrics)
            m.update({"rlrt/lambda": lam, "actor/grad_norm": sum(grad_norms) / len(grad_norms),
                      "actor/lr": self.optimizer.param_groups[0]["lr"], "perf/step_time_s": step_time,
                      "perf/train_time_s": train_time, "perf/weight_sync_s": sync_s,
                      "perf/tokens_per_s": m["perf/batch_tokens"] / max(step_time, 1e-9)})
        return m

    def _collect(self, samples: Sequence[Sample]):
        """Old-policy and teacher log-probs (one packed pass when the teacher is the current
        policy), then reference log-probs of the student rows when the KL term is on."""
        cfg = self.cfg
        budget = (cfg.log_probs_max_tokens_per_gpu or cfg.max_tokens_per_gpu) if cfg.use_dynamic_batch_size else None
        log_probs_only = replace(self.opts, topk=0, with_entropy=False)
        students = [replace(s, teacher_prompt_ids=None) for s in samples]

        def run(rows, opts, weights=None, topk_ids=None):
            if weights is None:
                return collect(self.chunks, rows, opts, cfg.micro_batch_size, budget, topk_ids)
            with weights.swapped_in(self.chunks):
                return collect(self.chunks, rows, opts, cfg.micro_batch_size, budget, topk_ids)

        if self.teacher is None:  # the current-policy teacher shares the old-policy pass (eq. 1)
            return self._with_reference(run(samples, self.opts), run, students, log_probs_only)
        out = run(students, self.opts)
        distill = bool(self.opts.topk)
        if self.teacher is self.reference and not distill:  # both the starting weights: one pass for both
            both = run(samples, log_probs_only, self.reference)
            out.teacher_logprobs, out.ref_logprobs = both.teacher_logprobs, both.student_logprobs
            return out
        teachers = [replace(s, prompt_ids=s.teacher_prompt_ids, teacher_prompt_ids=None)
                    for s in samples if s.has_teacher]
        if teachers and distill:  # the teacher is scored at the policy's top-K ids of each position
            ids = self._stage_topk_ids(teachers, lambda i: out.student_topk_ids[i])
            res = run(teachers, replace(self.opts, with_entropy=False), self.teacher, ids)
            out.teacher_logprobs, out.teacher_topk_logprobs = res.student_logprobs, res.student_topk_logprobs
        elif teachers:
            out.teacher_logprobs = run(teachers, log_probs_only, self.teacher).student_logprobs
        return self._with_reference(out, run, students, log_probs_only)

    def _stage_topk_ids(self, samples, ids_of) -> dict[int, torch.Tensor]:
        """The top-K ids a pass scores at: ``ids_of(sample index)`` on the last pipeline stage
        (the only one that has and reads them), same-shaped zeros on the others."""
        if self.is_last_stage:
            return {s.index: ids_of(s.index) for s in samples}
        return {s.index: torch.zeros(len(s.response_ids), self.opts.topk, dtype=torch.long) for s in samples}

    def _with_reference(self, out, run, students, opts):
        if self.reference is not None:
            out.ref_logprobs = run(students, opts, self.reference).student_logprobs
        return out

    def _per_sample_inputs(self, samples, collected, lam: float, pieces: dict) -> dict:
        """Token advantages and the loss inputs of each local sample (last pipeline stage)."""
        cfg = self.cfg
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
        tok_adv = rlrt_epilogue(s_lp, t_lp, adv, rewards, mask, lam, cfg.rlrt_clip_eps, cfg.advantage_estimator,
                                has_teacher if self.method.token_weight is not None else None)
        self._credit_metrics(samples, s_lp, t_lp, mask, adv, tok_adv, has_teacher, pieces)
        out = {}
        for i, s in enumerate(samples):
            n = len(s.response_ids)
            entry = {"adv": tok_adv[i, :n], "rollout_lp": torch.tensor(s.rollout_logprobs[:n]),
                     "reward": rewards[i], "has_teacher": bool(has_teacher[i])}
            if collected is not None:
                entry["old_lp"] = collected.student_logprobs[s.index]
                if collected.ref_logprobs is not None:
                    entry["ref_lp"] = collected.ref_logprobs[s.index]
                if self.method.uses_distillation:
                    entry["topk_ids"] = collected.student_topk_ids[s.index]
                    entry["teacher_topk"] = collected.teacher_topk_logprobs.get(s.index)
            out[s.index] = entry
        # rollout engine vs trainer log-probs of the same tokens (drift that TIS corrects)
        if collected is not None and self.ps.get_tensor_model_parallel_rank() == 0:
            diffs = torch.cat([(collected.student_logprobs[s.index] - torch.tensor(s.rollout_logprobs)).abs()
                               for s in samples])
            pieces["rollout/logprob_abs_diff_mean"] = (diffs.sum().item(), float(diffs.numel()))
            pieces["rollout/logprob_abs_diff_max"] = (diffs.max().item(), 1.0)
        return out

    def _credit_metrics(self, samples, s_lp, t_lp, mask, adv, tok_adv, has_teacher, pieces):
        if self.ps.get_tensor_model_parallel_rank() != 0:
            return
        cfg = self.cfg
        n_tok = float(mask.sum())
        shift = ((tok_adv - adv[:, None]).abs() * mask).sum().item()
        pieces["rlrt/adv_abs_shift_mean"] = (shift, n_tok)
        teacher_tokens = float((mask & has_teacher[:, None]).sum())
        pieces["rlrt/teacher_tokens_frac"] = (teacher_tokens, n_tok)
        if t_lp is None or self.method.token_weight is None:
            return
        gate = has_teacher.clone()
        if self.method.weight_on == "correct":
            gate &= torch.tensor([s.correct for s in samples])
        wmask = mask & gate[:, None]
        if not bool(wmask.any()):
            return
        w = self.method.token_weight(adv[:, None], s_lp, t_lp)
        n = float(wmask.sum())
        eps = cfg.rlrt_clip_eps
        # the clipped weight is what enters eq. 7; the raw one is heavy-tailed, so log its log
        pieces["rlrt/weight_mean"] = (w.clamp(1 - eps, 1 + eps)[wmask].sum().item(), n)
        pieces["rlrt/log_weight_mean"] = (w.log()[wmask].sum().item(), n)
        pieces["rlrt/clip_frac_low"] = ((w < 1 - eps)[wmask].float().sum().item(), n)
        pieces["rlrt/clip_frac_high"] = ((w > 1 + eps)[wmask].float().sum().item(), n)
        pieces["rlrt/clip_frac"] = (((w < 1 - eps) | (w > 1 + eps))[wmask].float().sum().item(), n)
        d = information_asymmetry(s_lp, t_lp)
        pieces["rlrt/d_positive_frac"] = ((d[wmask] > 0).float().sum().item(), n)
        pieces["rlrt/d_mean"] = (d[wmask].sum().item(), n)

    def _update(self, samples: Sequence[Sample], per_sample: dict, pieces: dict) -> float:
        """One optimizer step on this rank's share of a mini-batch."""
        cfg = self.cfg
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        method = cfg.advantage_estimator
        tp0 = self.ps.get_tensor_model_parallel_rank() == 0
        count_seqs = cfg.loss_agg_mode != "token-mean"

        def loss_fn(mb, cols):
            vals, mask = student_values(mb, cols)
            rows = mb.packed.student_sample_index.tolist()
            width = mask.shape[1]
            dev = cols.device

            def stack(key):
                return padded([per_sample[i][key] for i in rows], width).to(dev)

            logp = vals[..., 0]
            entropy = vals[..., 1] if self.opts.with_entropy else None
            old = stack("old_lp") if "old_lp" in per_sample[rows[0]] else logp.detach()
            adv = stack("adv")
            rewards = torch.stack([per_sample[i]["reward"] for i in rows]).to(dev)
            has_teacher = torch.tensor([per_sample[i]["has_teacher"] for i in rows], device=dev)
            pieces_ = policy_token_loss(logp, old, adv, mask, self.loss_cfg,
                                        rollout_logprobs=stack("rollout_lp") if cfg.tis_clip else None, entropy=entropy,
                                        ref_logprobs=stack("ref_lp") if self.reference is not None else None)
            distill = None
            if self.method.uses_distillation:
                k = self.opts.topk
                col = 1 + int(self.opts.with_entropy)
                student_topk = vals[..., col : col + k]
                teacher_topk = torch.stack([
                    _pad_rows(per_sample[i]["teacher_topk"], width, k) if per_sample[i]["teacher_topk"] is not None
                    else torch.zeros(width, k) for i in rows]).to(dev)
                distill = distillation_token_loss(student_topk, teacher_topk, alpha=cfg.distill_alpha,
                                                  entropy_beta=cfg.srpo_entropy_beta)
            loss, lm = total_loss(method, mask, rewards, pg_token_loss=None if method in ("sdpo", "opsd") else pieces_.pg,
                                  distill_token_loss=distill, has_teacher=has_teacher,
                                  regularizer_token_loss=pieces_.regularizer, distill_coef=cfg.distill_coef,
                                  agg_mode=cfg.loss_agg_mode, global_num_tokens=1.0, global_num_seqs=1.0)
            loss_mask = loss_token_mask(method, mask, rewards, has_teacher)
            count = (loss_mask.any(1).sum() if count_seqs else loss_mask.sum()).to(torch.int)
            report = {}
            if tp0:
                ntok = float(mask.sum())
                for name, v in pieces_.metrics.items():
                    if name != "num_tokens":
                        key = f"loss/{name}" if name.startswith("pg_") else f"actor/{name}"
                        report[key] = (v.item(), 1.0) if name.endswith("_max") else (v.item() * ntok, ntok)
                report["loss/pg"] = (lm.get("pg_loss", torch.zeros(())).item(), float(count))
                if "distill_loss" in lm:
                    report["loss/distill"] = (lm["distill_loss"].item(), float(count))
            return loss, count, report

        budget = cfg.max_tokens_per_gpu if cfg.use_dynamic_batch_size else None
        topk_ids = (self._stage_topk_ids(samples, lambda i: per_sample[i]["topk_ids"])
                    if self.method.uses_distillation else None)
        reports = train_minibatch(self.chunks, samples, self.opts, cfg.micro_batch_size, budget, loss_fn, topk_ids)
        for report in reports or []:
            for name, (v, w) in report.items():
                if name.endswith("_max"):
                    pieces[name] = (max(pieces.get(name, (-math.inf, 1.0))[0], v), 1.0)
                else:
                    a, b = pieces.get(name, (0.0, 0.0))
                    pieces[name] = (a + v, b + w)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step failed (non-finite gradients)")
        self.scheduler.step(increment=1)
        return float(grad_norm)

    # -- evaluation, checkpoints, the loop ---------------------------------------------------

    def evaluate(self) -> dict:
        """Held-out avg@k / pass@k on rank 0 with the rollout engine (current weights)."""
        if not self.rank0 or not self.eval_set:
            return {}
        cfg = self.cfg
        outs = self.engine.generate([p.prompt_ids for p in self.eval_set], cfg.eval_n_samples,
                                    self._sampling(cfg.eval_temperature, seed=cfg.seed + 1))
        flat = [(p, s) for p, group in zip(self.eval_set, outs) for s in group]
        scored = self.reward.score([self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for _, s in flat],
                                   [p for p, _ in flat])
        correct = scored.correct
        n = cfg.eval_n_samples
        per_prompt = [correct[i : i + n] for i in range(0, len(correct), n)]
        return {f"eval/{k}": v for k, v in summarize(per_prompt, ks=sorted({1, n})).items()}

    def save(self, step: int) -> None:
        if not self.cfg.save:
            return
        state = {"loader": self.loader.state_dict() if self.rank0 else None,
                 "lambda_schedule": self.lam_schedule.state_dict(), "method": self.cfg.advantage_estimator}
        holder = [state]
        dist.broadcast_object_list(holder, src=0)
        extra = {"rollout_generator": self.engine.generator.get_state(), "peer_generator": self.peer_generator.get_state()} \
            if self.rank0 and hasattr(self.engine, "generator") else None
        snapshots = {ckpt.TEACHER_EMA_DIR: self.teacher} if self.cfg.teacher_weights == "ema" and self.teacher else {}
        path = ckpt.save_checkpoint(self.cfg.save, step, self.chunks, self.optimizer, self.scheduler, self.spec,
                                    self.hf_dir, holder[0], extra, self.cfg.keep_last_n_checkpoints, snapshots)
        self._log(f"saved checkpoint {path}")

    def train(self) -> dict:
        cfg = self.cfg
        history = {}
        if self.start_step == 0:
            before = self.evaluate()
            if before:
                self._log("held-out before training: " + ", ".join(f"{k}={v:.3f}" for k, v in before.items()))
                self.metrics.write(0, before)
                history["before"] = before
        for step in range(self.start_step, cfg.train_iters):
            m = self.step(step)
            if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.train_iters:
                m.update(self.evaluate())
            self.metrics.write(step + 1, m)
            if self.rank0 and ((step + 1) % cfg.log_interval == 0 or step + 1 == cfg.train_iters):
                print(console_line(step + 1, cfg.train_iters, m), flush=True)
            if cfg.save_interval and (step + 1) % cfg.save_interval == 0 and step + 1 < cfg.train_iters:
                self.save(step + 1)
        after = self.evaluate()
        if after:
            self._log("held-out after training: " + ", ".join(f"{k}={v:.3f}" for k, v in after.items()))
            self.metrics.write(cfg.train_iters, {**after, "eval/final": 1.0})
            history["after"] = after
        if self.start_step < cfg.train_iters or not ckpt.latest_checkpoint(cfg.save):
            self.save(cfg.train_iters)
        return history

    def close(self) -> None:
        self.metrics.close()
        if self.rank0:
            self.reward.close()
        self.fleet.shutdown()


def _pad_rows(x: torch.Tensor, width: int, k: int) -> torch.Tensor:
    out = torch.zeros(width, k)
    out[: x.shape[0]] = x
    return out
