"""Setting up a run: the megatron model chunks, optimizer and LR schedule, the resume point,
and the weight snapshots beside the policy (the KL term's reference, a frozen or EMA teacher).

All of it megatron's own (DDP, distributed optimizer, OptimizerParamScheduler); torchtitan's
``train.py`` does the same in its ``__init__``, here as functions so the trainer reads short.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from megatron_rlrt.algorithms import MethodSpec
from megatron_rlrt.config import Config
from megatron_rlrt.models.hf_checkpoint import load_hf_weights
from megatron_rlrt.models.megatron_checkpoint import (
    METADATA,
    load_hf_into_model,
    load_model_checkpoint,
    spec_of_checkpoint,
)
from megatron_rlrt.models.qwen3 import CheckpointError, Qwen3Spec, build_model, transformer_config
from megatron_rlrt.precision import Fp8Options
from megatron_rlrt.trainer import checkpoint as ckpt
from megatron_rlrt.trainer import run_dir
from megatron_rlrt.trainer.weight_snapshot import WeightSnapshot


@dataclass
class ModelAndOptimizer:
    chunks: list  # DDP-wrapped model chunks of this rank (several with virtual pipeline stages)
    optimizer: Any  # megatron's (distributed) optimizer
    scheduler: Any  # OptimizerParamScheduler
    tconfig: Any  # megatron TransformerConfig


def build_model_and_optimizer(cfg: Config, arch: Qwen3Spec, hf_dir: str) -> ModelAndOptimizer:
    """The policy, loaded from --load or the HF checkpoint, wrapped in megatron DDP, with Adam
    and the LR schedule over ``train_iters * optimizer_steps_per_rl_step`` optimizer steps."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    tconfig = transformer_config(
        arch, tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size, sequence_parallel=cfg.sequence_parallel,
        params_dtype=dtype, perform_initialization=False, **cfg.recompute_options(),
        fp8=Fp8Options.from_config(cfg),  # TE FP8 (--fp8-*), validated by Config.validate
        calculate_per_token_loss=True,  # we return loss sums + counts; megatron divides grads once
    )
    modules = build_model(arch, tconfig)
    if cfg.load:
        load_model_checkpoint(modules, cfg.load)
    else:
        load_hf_into_model(modules, arch, load_hf_weights(hf_dir, arch))
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=cfg.use_distributed_optimizer)
    chunks = [DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=c) for c in modules]
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad, bf16=cfg.bf16,
        params_dtype=dtype, use_distributed_optimizer=cfg.use_distributed_optimizer), chunks)
    total = max(1, cfg.train_iters * cfg.optimizer_steps_per_rl_step)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.lr_warmup_iters else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=min(cfg.lr_warmup_iters, total - 1), lr_decay_steps=total,
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=total, wd_incr_style="constant")
    return ModelAndOptimizer(chunks, optimizer, scheduler, tconfig)


@dataclass
class ResumePoint:
    step: int = 0
    path: str | None = None  # the checkpoint resumed from (None: a fresh run)
    loader_state: dict | None = None
    rng: dict | None = None  # rank 0's generator states
    exposure_state: dict | None = None  # the teacher-exposure schedule (ATESD controller)


def restore(cfg: Config, model: ModelAndOptimizer, log=print) -> ResumePoint:
    """Load the latest checkpoint of --save into model and optimizer (``run_dir.prepare``
    decides: resume, --overwrite, --no-auto-resume, or refuse)."""
    path = run_dir.prepare(cfg, log=log)
    if path is None:
        return ResumePoint()
    state, rng = ckpt.load_checkpoint(path, model.chunks, model.optimizer, model.scheduler, log=log)
    return ResumePoint(int(state["step"]), path, state.get("loader"), rng, state.get("exposure"))


def needs_initial_weights(cfg: Config, method: MethodSpec) -> bool:
    """The reference policy (without --ref-load), the 'initial' teacher and a model reward's
    scorer (without --rlt-student-load) are the starting weights; an EMA teacher starts from
    them too, but only a fresh run needs them (a resumed one loads it)."""
    return ((cfg.kl_coef > 0 and not cfg.ref_load) or (method.needs_teacher and cfg.teacher_weights == "initial")
            or (method.model_reward is not None and not cfg.rlt_student_load))


def reference_weights(cfg: Config, chunks, arch: Qwen3Spec, initial: WeightSnapshot | None,
                      log=print) -> WeightSnapshot | None:
    """The KL term's reference policy: the starting weights, or --ref-load (a megatron-rlrt
    checkpoint or a HF directory of the same architecture) read into this rank's shards."""
    if cfg.kl_coef <= 0:
        return None
    if not cfg.ref_load:  # shared with the initial teacher / scorer unless it will move
        return initial.copy() if cfg.resolved_ref_update()[0] else initial
    snapshot = load_snapshot(cfg.ref_load, "--ref-load", chunks, arch)
    log(f"reference policy of the KL term: {cfg.ref_load}")
    return snapshot


def resumed_reference(cfg: Config, chunks, reference: WeightSnapshot | None,
                      resumed_from: str | None) -> WeightSnapshot | None:
    """A reference that --ref-update-interval moves is the checkpoint's (a resumed run continues
    from where it was); a fixed one is the starting weights or --ref-load, as in a fresh run."""
    if reference is None or resumed_from is None or not cfg.resolved_ref_update()[0]:
        return reference
    return _checkpointed_snapshot(
        chunks, resumed_from, ckpt.REFERENCE_DIR, f"--ref-update-interval {cfg.resolved_ref_update()[0]}",
        "it was saved by a run whose reference did not move); resume with --ref-update-interval 0, or start a new run")


def _checkpointed_snapshot(chunks, resumed_from: str, subdir: str, flag: str, why: str) -> WeightSnapshot:
    """The weight snapshot a checkpoint keeps in ``subdir`` (moving reference, EMA teacher)."""
    path = os.path.join(resumed_from, subdir)
    if not os.path.isdir(path):
        raise CheckpointError(f"{flag}: the checkpoint {resumed_from} has no {subdir}/ ({why}")
    return WeightSnapshot.load(chunks, path)


def scorer_weights(cfg: Config, method: MethodSpec, chunks, arch: Qwen3Spec, initial: WeightSnapshot | None,
                   log=print) -> WeightSnapshot | None:
    """The frozen scorer of a model-computed reward (RLT's student): the starting weights, or
    --rlt-student-load; None for verifier-rewarded methods."""
    if method.model_reward is None:
        return None
    if not cfg.rlt_student_load:
        return initial
    snapshot = load_snapshot(cfg.rlt_student_load, "--rlt-student-load", chunks, arch)
    log(f"frozen student of the {method.name} reward: {cfg.rlt_student_load}")
    return snapshot


def load_snapshot(path: str, flag: str, chunks, arch: Qwen3Spec) -> WeightSnapshot:
    """Weights of ``path`` (a megatron-rlrt checkpoint, any TP/PP, or a HF directory of the
    policy's architecture) as a snapshot of this rank's shards; the model keeps its own."""
    if os.path.isfile(os.path.join(path, METADATA)):
        other = spec_of_checkpoint(path)
        load = lambda: load_model_checkpoint(chunks, path)  # noqa: E731
    elif os.path.isfile(os.path.join(path, "config.json")):
        other = Qwen3Spec.from_hf_dir(path)
        load = lambda: load_hf_into_model(chunks, arch, load_hf_weights(path, arch))  # noqa: E731
    else:
        raise CheckpointError(f"{flag} {path}: neither a megatron-rlrt checkpoint ({METADATA}) nor a "
                              "Hugging Face model directory (config.json)")
    differ = {f: (getattr(other, f), getattr(arch, f)) for f in vars(arch)
              if f != "dtype" and getattr(other, f) != getattr(arch, f)}
    if differ:
        raise CheckpointError(f"{flag} {path}: another architecture than the policy's "
                              f"(field: ({flag}, policy)): {differ}")
    return WeightSnapshot.loaded_by(chunks, load)


def teacher_weights(cfg: Config, method: MethodSpec, chunks, initial: WeightSnapshot | None,
                    resumed_from: str | None) -> WeightSnapshot | None:
    """Teacher weights for --teacher-weights initial|ema (None: the current policy, eq. 1)."""
    if cfg.teacher_weights == "current" or not method.needs_teacher:
        return None
    if cfg.teacher_weights == "initial":
        return initial
    if resumed_from is None:  # a fresh run: the model holds the starting weights
        return WeightSnapshot.of(chunks)
    return _checkpointed_snapshot(chunks, resumed_from, ckpt.TEACHER_EMA_DIR, "--teacher-weights ema",
                                  "it was saved by a run with another teacher); resume with the same --teacher-weights")
