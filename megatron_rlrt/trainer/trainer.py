"""The RL training loop on megatron-core.

One RL step (``Trainer.step``), as data, and where each part lives:

    prompts -> rollout engine (K samples each, sampler log-probs)           rollout_batch.build_rollout_batch
            -> verifier rewards -> group advantages A                         (rank 0)
            -> teacher views (RLRT: correct rollouts of groups with A != 0)
            -> broadcast; split into optimizer mini-batches and DP shards    rollout_batch.dp_shard
            -> ONE packed forward: log P_S(y_t) and log P_T(y_t)             model_step.score_rollouts
            -> model-computed rewards (RLT): frozen scorer pass over the     model_reward.apply_model_reward
               reward views, rewards gathered over DP, group advantages A
            -> token advantages A_t (eq. 6-7 for RLRT)                       loss.loss_inputs
            -> PPO/GRPO update per mini-batch (pipeline schedule, DDP, Adam) loss.rl_loss, model_step.train_minibatch
            -> weights -> rollout engine (same HF-name mapping as tools/)    rollout.weight_sync
            -> metrics, checkpoint                                           metrics, checkpoint

Set-up (model, optimizer, resume, reference/teacher weights) is ``setup``; what only rank 0
holds (data, verifier, rollout engine, evaluation) is ``services.Rank0Services``.

Everything distributed is megatron's own (parallel_state, DDP, optimizer, schedules,
dist_checkpointing); the algorithm is the pure functions in ``megatron_rlrt.algorithms``.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Sequence

import torch.distributed as dist

from megatron_rlrt import parallel
from megatron_rlrt.algorithms import PolicyLossConfig, get_method, make_lambda_schedule
from megatron_rlrt.config import Config
from megatron_rlrt.models.megatron_checkpoint import spec_of_checkpoint
from megatron_rlrt.models.qwen3 import Qwen3Spec
from megatron_rlrt.precision import pack_multiple
from megatron_rlrt.rollout.fleet import RolloutFleet
from megatron_rlrt.rollout.registry import create_engine
from megatron_rlrt.trainer import checkpoint as ckpt
from megatron_rlrt.trainer import setup
from megatron_rlrt.trainer.loss import RLLossConfig, SampleInputs, loss_inputs, rl_loss
from megatron_rlrt.trainer.metrics import MetricSums, MetricsWriter, console_line, phase, reduce_to_rank0
from megatron_rlrt.trainer.model_reward import apply_model_reward
from megatron_rlrt.trainer.model_step import StepOptions, score_rollouts, stage_topk_ids, train_minibatch
from megatron_rlrt.trainer.rollout_batch import Sample, build_rollout_batch, dp_shard
from megatron_rlrt.trainer.services import Rank0Services, build_rank0_services, on_rank0
from megatron_rlrt.trainer.weight_snapshot import WeightSnapshot


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
        self.arch = spec_of_checkpoint(cfg.load) if cfg.load else Qwen3Spec.from_hf_dir(self.hf_dir)
        self.arch.check_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                                 cfg.virtual_pipeline_model_parallel_size)
        model = setup.build_model_and_optimizer(cfg, self.arch, self.hf_dir)
        self.chunks, self.optimizer, self.scheduler = model.chunks, model.optimizer, model.scheduler
        # the weights the run starts from (HF or --load), before any resume: the reference
        # policy of the KL term (unless --ref-load) and the --teacher-weights initial teacher
        initial = WeightSnapshot.of(self.chunks) if setup.needs_initial_weights(cfg, self.method) else None
        self.reference = setup.reference_weights(cfg, self.chunks, self.arch, initial, self._log)
        # the frozen scorer of a model-computed reward (RLT's student), None for verifier rewards
        self.scorer = setup.scorer_weights(cfg, self.method, self.chunks, self.arch, initial, self._log)
        self.lam_schedule = make_lambda_schedule(cfg.rlrt_lambda, cfg.rlrt_lambda_decay_steps)
        self.loss_cfg = RLLossConfig(
            PolicyLossConfig(cfg.eps_clip, cfg.eps_clip_high, cfg.eps_clip_c or None, cfg.loss_agg_mode,
                             cfg.tis_clip or None, cfg.entropy_coef, cfg.kl_coef, cfg.kl_type),
            distill_coef=cfg.distill_coef, distill_alpha=cfg.distill_alpha, distill_entropy_beta=cfg.srpo_entropy_beta)
        self.opts = StepOptions(temperature=cfg.rollout_temperature, with_entropy=True,
                                topk=cfg.distill_topk if self.method.uses_distillation else 0,
                                use_te=self.platform.has_transformer_engine,
                                pad_to_multiple_of=pack_multiple(cfg),  # SP and FP8 GEMM alignment
                                logprob_precision=cfg.logprob_precision,
                                sequence_parallel_size=cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1)
        resume = setup.restore(cfg, model, log=self._log)
        if resume.path:
            self._log(f"resumed from {resume.path} (step {resume.step})")
        self.start_step = resume.step
        self.teacher = setup.teacher_weights(cfg, self.method, self.chunks, initial, resume.path)
        self.reference = setup.resumed_reference(cfg, self.chunks, self.reference, resume.path)
        self.ref_update_interval, self.ref_update_mix = cfg.resolved_ref_update()
        self.services: Rank0Services | None = None  # rank 0 only

        def build_services():
            self.services = build_rank0_services(cfg, self.hf_dir, resume.loader_state, resume.rng,
                                                 resume.exposure_state)

        on_rank0(build_services, "loading data and verifier")
        # the rollout servers of every node (collective); rank 0 generates through fleet.engine
        self.fleet = RolloutFleet.create(cfg, self.hf_dir, self.services.tokenizer if self.services else None,
                                         create_engine)
        on_rank0(lambda: self.services.attach_engine(self.fleet, resume.rng), "setting up the rollout engine")
        self.metrics_writer = MetricsWriter(cfg.save, cfg.tensorboard, cfg.wandb_project, cfg.to_dict(), self.start_step)
        self._sync_engine(version=self.start_step)

    # -- helpers -----------------------------------------------------------------------------

    def _log(self, msg: str) -> None:
        if self.rank0:
            print(f"[megatron-rlrt] {msg}", flush=True)

    @property
    def is_last_stage(self) -> bool:
        return self.ps.is_pipeline_last_stage(ignore_virtual=True)

    @property
    def max_tokens(self) -> int | None:
        """The token budget per training micro-batch (--use-dynamic-batch-size), else None."""
        return self.cfg.max_tokens_per_gpu if self.cfg.use_dynamic_batch_size else None

    @property
    def max_logprob_tokens(self) -> int | None:
        """The token budget per micro-batch of the no-grad log-prob passes (no activations kept)."""
        cfg = self.cfg
        return (cfg.log_probs_max_tokens_per_gpu or cfg.max_tokens_per_gpu) if cfg.use_dynamic_batch_size else None

    def _sync_engine(self, version: int) -> float:
        """Collective: the servers take their weights back, load ``version``, take their KV cache."""
        return self.fleet.refresh(self.chunks, self.arch, version)

    def make_batch(self, step: int = 0):
        """The step's rollout batch, built on rank 0 and broadcast to every rank."""
        return on_rank0(lambda: build_rollout_batch(self.services, self.cfg, self.method, step),
                        f"making the rollout batch of step {step + 1}")

    def score(self, samples: Sequence[Sample]):
        """Old-policy, teacher and reference log-probs of ``samples`` (model_step.score_rollouts)."""
        return score_rollouts(self.chunks, samples, self.opts, self.cfg.micro_batch_size, self.max_logprob_tokens,
                              self.teacher, self.reference)

    # -- one RL step -------------------------------------------------------------------------

    def step(self, step: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        lam = self.lam_schedule.value(step)
        batch = self.make_batch(step)
        dp_rank, dp_size = self.ps.get_data_parallel_rank(), self.ps.get_data_parallel_world_size()
        per_mb = len(batch.samples) if cfg.dynamic_sampling else (cfg.global_batch_size or len(batch.samples))
        minibatches = [dp_shard(mb, dp_rank, dp_size) for mb in batch.minibatches(per_mb)]
        if any(len(mb) == 0 for mb in minibatches) or not batch.samples:
            self._log(f"step {step}: no trainable samples on some rank (dynamic sampling or empty responses); "
                      "skipping the update")
            return {**batch.metrics, "perf/step_time_s": time.perf_counter() - t0, "train/skipped": 1.0,
                    **self._update_reference(step)}
        local = [s for mb in minibatches for s in mb]
        t_train = time.perf_counter()
        # on-policy single mini-batch GRPO needs no separate pass: old log-probs = the current ones
        need_scores = (self.method.needs_teacher or len(minibatches) > 1 or self.method.uses_distillation
                       or self.reference is not None or self.scorer is not None)
        sums = MetricSums()
        reports = sums if self.ps.get_tensor_model_parallel_rank() == 0 else None
        scores = None
        if need_scores:
            with phase("log-probs", cfg.progress and self.rank0):
                scores = self.score(local)
        if self.scorer is not None:  # rewards from a frozen model, then the group advantages
            with phase("model reward", cfg.progress and self.rank0):
                local = apply_model_reward(self.chunks, local, scores, self.method, self.scorer, self.opts,
                                           cfg.micro_batch_size, self.max_logprob_tokens, cfg, reports)
        t_scores = time.perf_counter()
        inputs = loss_inputs(local, scores, self.method, lam, cfg.rlrt_clip_eps, reports) if self.is_last_stage else {}
        with phase("update", cfg.progress and self.rank0):
            grad_norms = [self._update(mb, inputs, sums) for mb in minibatches]
        t_sync = time.perf_counter()
        sums.add("perf/logprob_time_s_max", t_scores - t_train)
        sums.add("perf/update_time_s_max", t_sync - t_scores)
        if (self.ps.get_tensor_model_parallel_rank() == 0 and self.ps.get_pipeline_model_parallel_rank() == 0
                and self.ps.get_context_parallel_rank() == 0):
            # one contribution per data-parallel replica, summed over replicas
            sums.add("perf/student_tokens_total", float(sum(s.student_tokens for s in local)))
            sums.add("perf/teacher_tokens_total", float(sum(s.teacher_tokens for s in local)))
        sync_s = self._sync_engine(version=step + 1)
        if self.teacher is not None and cfg.teacher_weights == "ema":
            self.teacher.ema_update(self.chunks, cfg.teacher_ema_rate)
        ref_update = self._update_reference(step)
        metrics = reduce_to_rank0(sums)
        if self.rank0:
            step_time = time.perf_counter() - t0
            metrics.update(batch.metrics)
            metrics.update(ref_update)
            if self.method.token_weight is not None:  # lambda scales the token weight (eq. 7)
                metrics["rlrt/lambda"] = lam
            metrics.update({"actor/grad_norm": sum(grad_norms) / len(grad_norms),
                            "actor/lr": self.optimizer.param_groups[0]["lr"], "perf/step_time_s": step_time,
                            "perf/train_time_s": t_sync - t_train, "perf/weight_sync_s": sync_s,
                            "perf/tokens_per_s": metrics["perf/batch_tokens"] / max(step_time, 1e-9)})
            self.services.observe_step(metrics)
        return metrics

    def _update_reference(self, step: int) -> dict:
        """After step ``step`` (0-based): every --ref-update-interval steps the KL reference moves
        to the policy, ref <- (1 - mix) ref + mix policy (TRL's SyncRefModelCallback at the end of
        global step step + 1). Returns the step's metric."""
        if not self.ref_update_interval or self.reference is None or (step + 1) % self.ref_update_interval:
            return {}
        self.reference.ema_update(self.chunks, self.ref_update_mix)
        return {"ref/updated": 1.0}

    def _update(self, samples: Sequence[Sample], inputs: dict[int, SampleInputs], sums: MetricSums) -> float:
        """One optimizer step on this rank's share of a mini-batch."""
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        tp0 = self.ps.get_tensor_model_parallel_rank() == 0
        loss_fn = partial(_reported_loss, inputs=inputs, method=self.method, config=self.loss_cfg, report=tp0)
        topk_ids = (stage_topk_ids(samples, lambda i: inputs[i].topk_ids, self.opts.topk)
                    if self.method.uses_distillation else None)
        for report in train_minibatch(self.chunks, samples, self.opts, self.cfg.micro_batch_size, self.max_tokens,
                                      loss_fn, topk_ids) or []:
            if report:  # CP ranks > 0 report nothing (model_step.train_minibatch)
                sums.merge(report)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step failed (non-finite gradients)")
        self.scheduler.step(increment=1)
        return float(grad_norm)

    # -- evaluation, checkpoints, the loop ---------------------------------------------------

    def evaluate(self) -> dict:
        """Held-out avg@k / pass@k on rank 0 with the rollout engine (current weights)."""
        return self.services.evaluate() if self.rank0 else {}

    def save(self, step: int) -> None:
        if not self.cfg.save:
            return
        exposure = self.services.exposure if self.rank0 else None
        state = {"loader": self.services.loader.state_dict() if self.rank0 else None,
                 "exposure": exposure.state_dict() if exposure is not None else None,
                 "lambda_schedule": self.lam_schedule.state_dict(), "method": self.cfg.advantage_estimator}
        holder = [state]
        dist.broadcast_object_list(holder, src=0)
        rng = self.services.rng_state() if self.rank0 else None
        snapshots = {ckpt.TEACHER_EMA_DIR: self.teacher} if self.cfg.teacher_weights == "ema" and self.teacher else {}
        if self.ref_update_interval and self.reference is not None:  # it moved: a resumed run needs it
            snapshots[ckpt.REFERENCE_DIR] = self.reference
        path = ckpt.save_checkpoint(self.cfg.save, step, self.chunks, self.optimizer, self.scheduler, self.arch,
                                    self.hf_dir, holder[0], rng, self.cfg.keep_last_n_checkpoints, snapshots)
        self._log(f"saved checkpoint {path}")

    def train(self) -> dict:
        cfg = self.cfg
        history = {}
        if self.start_step == 0:
            before = self.evaluate()
            if before:
                self._log("held-out before training: " + ", ".join(f"{k}={v:.3f}" for k, v in before.items()))
                self.metrics_writer.write(0, before)
                history["before"] = before
        for step in range(self.start_step, cfg.train_iters):
            metrics = self.step(step)
            if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.train_iters:
                metrics.update(self.evaluate())
            self.metrics_writer.write(step + 1, metrics)
            if self.rank0 and ((step + 1) % cfg.log_interval == 0 or step + 1 == cfg.train_iters):
                print(console_line(step + 1, cfg.train_iters, metrics), flush=True)
            if cfg.save_interval and (step + 1) % cfg.save_interval == 0 and step + 1 < cfg.train_iters:
                self.save(step + 1)
        after = self.evaluate()
        if after:
            self._log("held-out after training: " + ", ".join(f"{k}={v:.3f}" for k, v in after.items()))
            self.metrics_writer.write(cfg.train_iters, {**after, "eval/final": 1.0})
            history["after"] = after
        if self.start_step < cfg.train_iters or not ckpt.latest_checkpoint(cfg.save):
            self.save(cfg.train_iters)
        return history

    def close(self) -> None:
        self.metrics_writer.close()
        if self.services is not None:
            self.services.close()
        self.fleet.shutdown()


def _reported_loss(mb, cols, *, inputs, method, config, report: bool):
    """``rl_loss`` as megatron's loss function; metrics come from one rank per TP group."""
    loss, count, metrics = rl_loss(mb, cols, inputs, method, config)
    return loss, count, metrics if report else MetricSums()
