"""Every check of ``Config.validate``: one list of problems, each naming its flags.

Kept apart from ``config.py`` (the fields, their defaults and the flag/YAML parsing) so that adding a
flag and adding its check are two small edits in two short files.
"""

from __future__ import annotations

import dataclasses
import os

from megatron_rlrt.config import _flag, registered_names


def config_problems(cfg, world_size: int | None = None, capability=None) -> list[str]:
    """Every problem of ``cfg`` (empty: valid). ``capability``: the machine the FP8 rules check
    against (``precision.Capability``; default: this one)."""
    problems: list[str] = []

    def need(cond, msg):
        if not cond:
            problems.append(msg)

    need(cfg.hf_checkpoint or cfg.load, "--hf-checkpoint (or --load) is required: it defines the model")
    need(cfg.prompt_data, "--prompt-data is required")
    for name in ("hf_checkpoint", "prompt_data", "eval_data"):
        path = getattr(cfg, name)
        need(path is None or os.path.exists(path), f"--{_flag(name)} {path}: no such file or directory")
    need(cfg.load is None or os.path.isdir(cfg.load), f"--load {cfg.load}: no such directory")
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                 "rollout_batch_size", "n_samples_per_prompt", "micro_batch_size", "rollout_max_response_len",
                 "train_iters", "max_tokens_per_gpu"):
        need(getattr(cfg, name) >= 1, f"--{_flag(name)} must be >= 1 (got {getattr(cfg, name)})")
    for f in dataclasses.fields(cfg):
        registry, value = f.metadata.get("registry"), getattr(cfg, f.name)
        if registry and value not in registered_names(registry):
            problems.append(f"--{_flag(f.name)} {value!r}: not a registered name; registered {registry}: "
                            f"{registered_names(registry)} (a plug-in module registers more: --plugins)")
    from megatron_rlrt.algorithms.methods import METHODS

    method = METHODS.get(cfg.advantage_estimator)
    # pure distillation methods train no advantage, so a single sample per prompt is fine
    need(cfg.n_samples_per_prompt < 1 or cfg.n_samples_per_prompt >= 2
         or (method is not None and method.loss == "distill"),
         f"--n-samples-per-prompt {cfg.n_samples_per_prompt}: group advantages need at least 2 samples per prompt")
    for name in ("log_interval", "eval_n_samples", "keep_last_n_checkpoints", "rollout_batch_size_per_forward",
                 "rollout_num_gpus_per_engine", "update_weight_buffer_size"):
        need(getattr(cfg, name) >= 1, f"--{_flag(name)} must be >= 1 (got {getattr(cfg, name)})")
    for name in ("save_interval", "eval_interval", "lr_warmup_iters", "rollout_max_prompt_len",
                 "teacher_max_prompt_len"):
        need(getattr(cfg, name) >= 0, f"--{_flag(name)} must be >= 0 (got {getattr(cfg, name)})")
    need(cfg.reward_timeout > 0, f"--reward-timeout {cfg.reward_timeout} must be > 0 (seconds)")
    need(cfg.reward_workers is None or cfg.reward_workers >= 1,
         f"--reward-workers {cfg.reward_workers} must be >= 1")
    need(cfg.eval_max_prompts is None or cfg.eval_max_prompts >= 1,
         f"--eval-max-prompts {cfg.eval_max_prompts} must be >= 1")
    need(cfg.eval_temperature > 0, f"--eval-temperature {cfg.eval_temperature} must be > 0")
    need(cfg.lr >= 0 and cfg.min_lr >= 0, "--lr and --min-lr must be >= 0")
    need(cfg.virtual_pipeline_model_parallel_size is None or cfg.virtual_pipeline_model_parallel_size >= 1,
         "--virtual-pipeline-model-parallel-size must be >= 1")
    if cfg.global_batch_size is not None and cfg.n_samples_per_prompt >= 1 and cfg.rollout_batch_size >= 1:
        need(cfg.global_batch_size >= 1 and cfg.samples_per_step % cfg.global_batch_size == 0,
             f"--global-batch-size {cfg.global_batch_size} must divide --rollout-batch-size x "
             f"--n-samples-per-prompt = {cfg.samples_per_step}")
        need(cfg.global_batch_size % cfg.n_samples_per_prompt == 0,
             f"--global-batch-size {cfg.global_batch_size} must be a multiple of --n-samples-per-prompt "
             f"{cfg.n_samples_per_prompt} (whole groups per optimizer step)")
    if world_size is not None and min(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                                      cfg.context_parallel_size) >= 1:
        mp = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size * cfg.context_parallel_size
        if world_size % mp:
            problems.append(f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
                            f"--pipeline-model-parallel-size x --context-parallel-size = {mp}")
        else:
            dp = world_size // mp
            per_step = cfg.global_batch_size or cfg.samples_per_step
            need(per_step < 1 or per_step % dp == 0, f"samples per optimizer step {per_step} (--global-batch-size or --rollout-"
                 f"batch-size x --n-samples-per-prompt) must be divisible by the data-parallel size {dp}")
    need(0.0 <= cfg.rlrt_lambda <= 1.0, f"--rlrt-lambda {cfg.rlrt_lambda} must be in [0, 1]")
    need(cfg.rlrt_clip_eps >= 0, f"--rlrt-clip-eps {cfg.rlrt_clip_eps} must be >= 0")
    need(cfg.rlrt_lambda_decay_steps is None or cfg.rlrt_lambda_decay_steps >= 1,
         "--rlrt-lambda-decay-steps must be >= 1")
    need(0 <= cfg.eps_clip < 1 and cfg.eps_clip_high >= 0, "--eps-clip must be in [0, 1) and --eps-clip-high >= 0")
    need(not cfg.eps_clip_c or cfg.eps_clip_c > 1, f"--eps-clip-c {cfg.eps_clip_c} must be > 1 (or 0: off)")
    need(cfg.tis_clip >= 0, "--tis-clip must be >= 0 (0 disables it)")
    need(cfg.rollout_temperature > 0, "--rollout-temperature must be > 0")
    need(0 < cfg.rollout_top_p <= 1, "--rollout-top-p must be in (0, 1]")
    need(cfg.log_probs_max_tokens_per_gpu is None or cfg.log_probs_max_tokens_per_gpu >= 1,
         "--log-probs-max-tokens-per-gpu must be >= 1")
    need(cfg.distill_topk >= 1, "--distill-topk must be >= 1")
    need(cfg.recompute_granularity == "full" or (cfg.recompute_method is None and cfg.recompute_num_layers is None),
         "--recompute-method / --recompute-num-layers need --recompute-granularity full")
    need(cfg.recompute_num_layers is None or cfg.recompute_num_layers >= 1, "--recompute-num-layers must be >= 1")
    model_reward = method is not None and method.model_reward is not None
    need(cfg.rlt_student_load is None or model_reward,
         f"--rlt-student-load {cfg.rlt_student_load}: only a method with a model-computed reward (rlt) has a "
         f"frozen student; --advantage-estimator is {cfg.advantage_estimator}")
    need(cfg.rlt_student_load is None or os.path.isdir(cfg.rlt_student_load),
         f"--rlt-student-load {cfg.rlt_student_load}: no such directory (expected a megatron-rlrt checkpoint or a "
         "Hugging Face model directory)")
    need(not (model_reward and cfg.dynamic_sampling),
         f"--dynamic-sampling with --advantage-estimator {cfg.advantage_estimator}: its rewards are computed by a "
         "model after the batch is built, so zero-signal groups cannot be dropped beforehand")
    need(cfg.rlt_alpha >= 0 and cfg.rlt_lambda >= 0,
         f"--rlt-alpha {cfg.rlt_alpha} and --rlt-lambda {cfg.rlt_lambda} must be >= 0")
    need(cfg.kl_coef >= 0, f"--kl-coef {cfg.kl_coef} must be >= 0")
    need(cfg.ref_load is None or cfg.kl_coef > 0,
         f"--ref-load {cfg.ref_load}: the reference policy is used only by the KL term; set --kl-coef > 0")
    need(cfg.ref_load is None or os.path.isdir(cfg.ref_load), f"--ref-load {cfg.ref_load}: no such directory")
    need(cfg.ref_update_interval is None or cfg.ref_update_interval >= 0,
         f"--ref-update-interval {cfg.ref_update_interval} must be >= 0 (0: never)")
    need(cfg.ref_update_mix is None or 0 < cfg.ref_update_mix <= 1,
         f"--ref-update-mix {cfg.ref_update_mix} must be in (0, 1]")
    need(not cfg.ref_update_interval or cfg.kl_coef > 0,
         f"--ref-update-interval {cfg.ref_update_interval}: the reference policy is used only by the KL term; "
         "set --kl-coef > 0")
    need(0 <= cfg.distill_alpha <= 1, "--distill-alpha must be in [0, 1]")
    if method is not None:
        from megatron_rlrt.algorithms.atesd import parse_teacher_exposure

        try:
            exposure = parse_teacher_exposure(cfg.resolved_teacher_exposure(), cfg.atesd_config())
            need(method.needs_teacher or getattr(exposure, "rho", None) == 1.0,
                 f"--teacher-exposure {cfg.resolved_teacher_exposure()}: method {method.name!r} has no teacher "
                 "to expose a context to")
        except ValueError as exc:
            problems.append(str(exc))
    need(not cfg.sequence_parallel or cfg.tensor_model_parallel_size > 1,
         "--sequence-parallel needs --tensor-model-parallel-size > 1")
    from megatron_rlrt import precision

    problems += precision.check(cfg, capability)
    problems.append(model_layout_problem(cfg))
    from megatron_rlrt.trainer import run_dir

    problems.append(run_dir.problem(cfg.save, cfg.overwrite, cfg.no_auto_resume))
    return [p for p in problems if p]


def model_layout_problem(cfg) -> str | None:
    """TP/PP that cannot split the model, found from its config before any rank starts."""
    from megatron_rlrt.models.qwen3 import CheckpointError, Qwen3Spec

    try:
        if cfg.load and os.path.isdir(cfg.load):
            from megatron_rlrt.models.megatron_checkpoint import spec_of_checkpoint

            spec = spec_of_checkpoint(cfg.load)
        elif cfg.hf_checkpoint and os.path.isfile(os.path.join(cfg.hf_checkpoint, "config.json")):
            spec = Qwen3Spec.from_hf_dir(cfg.hf_checkpoint)
        else:
            return None
        if min(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) >= 1:
            spec.check_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                                cfg.virtual_pipeline_model_parallel_size)
    except (CheckpointError, ValueError) as exc:
        return str(exc)
    return None
