"""One typed configuration for a training run.

Flag names follow Megatron-LM where Megatron users already know the knob
(``--tensor-model-parallel-size``, ``--micro-batch-size``, ``--lr``, ``--clip-grad``, ...) and
slime for the RL knobs (``--rollout-batch-size``, ``--n-samples-per-prompt``,
``--advantage-estimator``, ``--eps-clip``, ...). Precedence: field defaults < YAML recipe
(``--config recipe.yaml``; keys are the flag names with ``_`` or ``-``) < command line.

``Config.validate()`` runs before any process group or model exists and names the flags
involved in every problem it finds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml



def _f(default, help: str, choices=None, flag: str | None = None, registry: str | None = None):
    """A config field; ``registry`` names the registry its value must be in (checked by
    ``validate``, listed by --help), so plug-ins registered by --plugins are valid values."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "registry": registry})


def registered_names(registry: str) -> list[str]:
    """The names in one of the registries (methods, engines, rewards, advantages)."""
    if registry == "methods":
        from megatron_rlrt.algorithms.methods import METHODS

        return sorted(METHODS)
    if registry == "engines":
        from megatron_rlrt.rollout.registry import ENGINES

        return sorted(ENGINES)
    if registry == "rewards":
        from megatron_rlrt.reward import list_rewards

        return list(list_rewards())
    raise KeyError(registry)


def import_plugins(spec: str | None) -> None:
    """Import the comma-separated modules (dotted names or .py paths) of --plugins: each may
    call register_method / register_advantage / register_engine / register_reward."""
    import importlib
    import importlib.util
    import sys

    for item in filter(None, (x.strip() for x in (spec or "").split(","))):
        try:
            if item.endswith(".py"):
                name = "megatron_rlrt_plugin_" + os.path.splitext(os.path.basename(item))[0]
                if name in sys.modules:
                    continue
                module_spec = importlib.util.spec_from_file_location(name, item)
                if module_spec is None or not os.path.isfile(item):
                    raise FileNotFoundError(f"no such file: {item}")
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(item)
        except Exception as exc:
            raise ConfigError(f"--plugins {item}: could not import it ({type(exc).__name__}: {exc})") from exc


@dataclass
class Config:
    # ---- model and checkpoints -----------------------------------------------------------
    hf_checkpoint: Optional[str] = _f(None, "Hugging Face Qwen3 checkpoint dir: architecture, tokenizer, and the "
                                            "initial weights unless --load is given")
    load: Optional[str] = _f(None, "megatron-rlrt checkpoint (tools/convert_hf_to_megatron.py output or a training "
                                   "checkpoint) to initialise the policy from")
    save: Optional[str] = _f(None, "run directory: checkpoints/, metrics.jsonl, tensorboard/, plots; a run with "
                                   "checkpoints here resumes from the latest one")
    save_interval: int = _f(0, "save a checkpoint every N RL steps (0: only at the end)")
    keep_last_n_checkpoints: int = _f(2, "how many checkpoints to keep (older ones are deleted after a new one is "
                                         "complete)")
    no_auto_resume: bool = _f(False, "start from scratch even if --save holds a previous run; that run is kept "
                                     "untouched and this one writes into a new subdirectory <save>/restart-N")
    overwrite: bool = _f(False, "delete the previous run in --save (checkpoints, metrics.jsonl, tensorboard/) and "
                                "start over; without it a used --save is resumed from checkpoints/latest or refused")
    bf16: bool = _f(False, "train with bfloat16 parameters (fp32 master weights in the optimizer)")

    # ---- precision: Transformer Engine FP8 (Megatron-LM's flags; megatron_rlrt/precision.py) ----
    fp8_format: Optional[str] = _f(None, "FP8 GEMMs in the transformer layers (Transformer Engine on a GPU; needs "
                                         "--bf16): e4m3 everywhere, or hybrid (e4m3 forward, e5m2 gradients). "
                                         "Embedding and LM head stay bf16, log-softmax fp32", choices=("e4m3", "hybrid"))
    fp8_recipe: str = _f("delayed", "FP8 scaling recipe: delayed (amax history), tensorwise (current per-tensor "
                                    "scaling), blockwise (1x128/128x128 blocks, Hopper+), mxfp8 (Blackwell sm_100)",
                         choices=("delayed", "tensorwise", "blockwise", "mxfp8"))
    fp8_margin: int = _f(0, "margin (power of 2) of the FP8 scaling factor")
    fp8_amax_history_len: int = _f(1, "amax history length of the delayed recipe")
    fp8_amax_compute_algo: str = _f("most_recent", "amax from the history: most_recent or max (delayed recipe)",
                                    choices=("most_recent", "max"))
    fp8_wgrad: bool = _f(True, "weight-gradient GEMMs in FP8 (--no-fp8-wgrad: in bf16)")
    fp8_param_gather: bool = _f(False, "keep the compute parameters in FP8 and all-gather them in FP8 (needs "
                                       "--use-distributed-optimizer)")
    first_last_layers_bf16: bool = _f(False, "keep the first/last transformer layers in bf16 under FP8 (not with "
                                             "--fp8-recipe delayed)")
    num_layers_at_start_in_bf16: int = _f(1, "layers at the start kept in bf16 with --first-last-layers-bf16")
    num_layers_at_end_in_bf16: int = _f(1, "layers at the end kept in bf16 with --first-last-layers-bf16")
    logprob_precision: str = _f("train", "precision of the no-grad student+teacher log-prob pass: train (the "
                                         "training precision, so D_t compares identical kernels) or bf16 (FP8 off "
                                         "for that pass)", choices=("train", "bf16"))

    # ---- parallelism -----------------------------------------------------------------------
    tensor_model_parallel_size: int = _f(1, "tensor-parallel size (splits heads, MLP and vocabulary)")
    pipeline_model_parallel_size: int = _f(1, "pipeline-parallel size (splits layers into stages)")
    virtual_pipeline_model_parallel_size: Optional[int] = _f(None, "model chunks per pipeline stage (interleaved "
                                                                   "1F1B schedule)")
    context_parallel_size: int = _f(1, "context-parallel size: each packed row is cut into 2 x CP chunks and CP "
                                       "rank i keeps chunks i and 2*CP-1-i (long responses; TE attention with "
                                       "cp_comm_type p2p on GPUs, the mask-free packed attention on CPUs)")
    sequence_parallel: bool = _f(False, "sequence parallelism for norms/dropout (needs TP>1; TE norms on a GPU, LocalRMSNorm on CPU)")
    use_distributed_optimizer: bool = _f(False, "shard optimizer state across data-parallel ranks (ZeRO-1)")
    recompute_granularity: Optional[str] = _f(None, "activation recomputation (Megatron-LM): 'full' recomputes whole "
                                                    "transformer layers in backward (least memory), 'selective' only "
                                                    "the core attention", choices=("full", "selective"))
    recompute_method: Optional[str] = _f(None, "with --recompute-granularity full: 'uniform' checkpoints every "
                                               "--recompute-num-layers layers as one unit, 'block' recomputes only "
                                               "the first --recompute-num-layers layers of each pipeline stage "
                                               "(default uniform)", choices=("uniform", "block"))
    recompute_num_layers: Optional[int] = _f(None, "with --recompute-granularity full: layers per checkpoint "
                                                   "(uniform) or recomputed layers per stage (block); default 1")

    # ---- optimisation ------------------------------------------------------------------------
    lr: float = _f(1e-6, "peak learning rate (paper: 1e-6 GRPO/RLSD/RLRT, 1e-5 SDPO, 5e-6 SRPO)")
    min_lr: float = _f(0.0, "learning rate at the end of the decay")
    lr_warmup_iters: int = _f(10, "linear warm-up length in optimizer steps")
    lr_decay_style: str = _f("constant", "learning-rate schedule after warm-up", choices=("constant", "linear", "cosine"))
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay")
    adam_beta1: float = _f(0.9, "Adam beta1 (first-moment decay)")
    adam_beta2: float = _f(0.999, "Adam beta2 (second-moment decay)")
    adam_eps: float = _f(1e-8, "Adam epsilon (denominator floor)")
    clip_grad: float = _f(1.0, "clip the global gradient norm to this value")
    train_iters: int = _f(100, "number of RL steps (each: one rollout batch, one or more optimizer steps)")
    seed: int = _f(1234, "random seed (data order, sampling, initialisation)")
    micro_batch_size: int = _f(1, "student rows per micro-batch (ignored with --use-dynamic-batch-size)")
    use_dynamic_batch_size: bool = _f(False, "pack micro-batches up to --max-tokens-per-gpu tokens instead of a "
                                             "fixed row count")
    max_tokens_per_gpu: int = _f(8192, "token budget per GPU of one packed training micro-batch with "
                                       "--use-dynamic-batch-size (a micro-batch holds up to this x "
                                       "--context-parallel-size tokens; a longer row gets a micro-batch of its own)")
    log_probs_max_tokens_per_gpu: Optional[int] = _f(None, "token budget per GPU of the no-grad student+teacher "
                                                           "log-prob pass with --use-dynamic-batch-size (default: "
                                                           "--max-tokens-per-gpu); it keeps no activations for "
                                                           "backward, so it can usually be larger")
    global_batch_size: Optional[int] = _f(None, "rollout samples per optimizer step (default: the whole rollout "
                                                "batch, i.e. one on-policy update per RL step)")

    # ---- rollout ------------------------------------------------------------------------------
    rollout_engine: str = _f("hf", "rollout engine by name (rollout/registry.py ENGINES)", registry="engines")
    rollout_batch_size: int = _f(8, "prompts per RL step")
    n_samples_per_prompt: int = _f(8, "rollouts per prompt (GRPO group size K)")
    rollout_max_response_len: int = _f(1024, "maximum response tokens")
    rollout_max_prompt_len: int = _f(2048, "prompts longer than this are skipped (counted)")
    rollout_temperature: float = _f(1.0, "sampling temperature (log-probs are computed at the same temperature; "
                                         "the RLT authors use 0.7)")
    rollout_top_p: float = _f(1.0, "nucleus (top-p) sampling threshold")
    rollout_top_k: int = _f(-1, "top-k sampling (-1: off)")
    rollout_batch_size_per_forward: int = _f(64, "sequences the hf engine generates at once")
    rollout_urls: Optional[str] = _f(None, "comma-separated server URLs for --rollout-engine sglang|vllm")
    colocate: bool = _f(False, "rollout servers share the training GPUs (release/resume memory around training)")
    rollout_num_gpus_per_engine: int = _f(1, "GPUs (tensor-parallel size) per rollout server")
    rollout_host: Optional[str] = _f(None, "address launched rollout servers listen on (default 127.0.0.1; 0.0.0.0 "
                                           "when colocated on several nodes, so rank 0 can reach every node's)")
    rollout_router_url: Optional[str] = _f(None, "a running sglang-router in front of --rollout-urls: /generate goes "
                                                 "through it, weights and memory control to every server directly")
    weight_sync: str = _f("auto", "how new weights reach --rollout-engine sglang servers: tensor (IPC handles of the "
                                  "trainer's memory; colocated), distributed (NCCL broadcast group), disk (snapshot "
                                  "in --weight-sync-dir); auto = tensor when colocated, else distributed on GPUs, "
                                  "else disk", choices=("auto", "tensor", "distributed", "disk"))
    weight_sync_dir: Optional[str] = _f(None, "directory for weight snapshots (disk weight sync; shared storage when "
                                              "servers run on other nodes); default: a temporary directory")
    update_weight_buffer_size: int = _f(512 * 1024**2, "bytes per weight-sync bucket")
    rollout_quantization: Optional[str] = _f(None, "FP8 rollouts: servers run W8A8 blockwise-FP8 GEMMs (--quantization "
                                                   "fp8) and every weight update is sent as FP8 weights with 128x128 "
                                                   "block scales; keep --tis-clip on", choices=("fp8",))
    rollout_model_path: Optional[str] = _f(None, "Hugging Face checkpoint the launched rollout servers load (default: "
                                                 "--hf-checkpoint); with --rollout-quantization fp8 a blockwise-FP8 "
                                                 "checkpoint of the same model, e.g. Qwen/Qwen3-8B-FP8")

    # ---- algorithm ---------------------------------------------------------------------------
    advantage_estimator: str = _f("rlrt", "training method by name (algorithms/methods.py METHODS; rlrt: "
                                          "reversed-teacher token weights on correct rollouts, eq. 6-7; rlt: train "
                                          "a teacher that sees the reference solution to write explanations, "
                                          "rewarded by a frozen student, see --rlt-*)", registry="methods")
    std_normalize: Optional[bool] = _f(None, "divide group advantages by the group std (default per method: on "
                                             "for rlrt/rlrt_all/rlsd (Table 5) and rlt (the RLT authors' GRPO), off "
                                             "otherwise)")
    dynamic_sampling: bool = _f(False, "drop groups whose rewards are all equal (DAPO); they carry no signal")
    rlrt_lambda: float = _f(0.5, "lambda_init: mix of the reverse weight into the advantage (eq. 7)")
    rlrt_clip_eps: float = _f(0.5, "eps_w: clip of the token weight to [1-eps_w, 1+eps_w] (paper best: 1.0 base, "
                                   "0.5 instruct, 0.2 thinking; RLSD 0.2)")
    rlrt_lambda_decay_steps: Optional[int] = _f(None, "linear decay of lambda to 0 over this many RL steps (paper: "
                                                      "none for base, 30 instruct/thinking, RLSD 50)")
    teacher_context: Optional[str] = _f(None, "privileged context c of the teacher (default per method: peer for "
                                              "rlrt/sdpo/srpo, answer for rlsd, reference for opsd)",
                                        choices=("peer", "reference", "answer"))
    teacher_peer_choice: str = _f("first", "which successful peer rollout becomes the context",
                                  choices=("first", "shortest", "random"))
    teacher_strip_thinking: bool = _f(False, "remove <think>...</think> from the context solution")
    teacher_max_prompt_len: int = _f(4096, "teacher prompts are cut to this many tokens by shortening the solution")
    teacher_weights: str = _f("current", "teacher parameters: the current policy (eq. 1; teacher rows share the "
                                         "student's packed forward), the initial policy, or an EMA",
                              choices=("current", "initial", "ema"))
    teacher_ema_rate: float = _f(0.05, "EMA rate with --teacher-weights ema")
    teacher_exposure: Optional[str] = _f(None, "how much of its context the teacher sees (ATESD): fixed:RHO = the "
                                               "first RHO in [0, 1] of the context's tokens (fixed:1 = all of it), "
                                               "atesd = a Beta-policy controller picks rho every --atesd-hold-window "
                                               "steps (default per method: atesd for atesd, fixed:1 otherwise)")
    atesd_hold_window: int = _f(10, "ATESD: RL steps each sampled exposure rho is held for (H)")
    atesd_discount: float = _f(0.9, "ATESD: discount gamma of the learning-progress reward over later windows")
    atesd_lr: float = _f(0.01, "ATESD: Adam learning rate of the exposure controller's policy gradient")
    atesd_horizon: int = _f(3, "ATESD: windows of learning progress credited to one exposure decision (L)")
    rlt_student_load: Optional[str] = _f(None, "RLT: the frozen student that scores the teacher's explanations "
                                               "when it is not the starting weights: a megatron-rlrt checkpoint "
                                               "(any TP/PP) or a Hugging Face directory of the policy's architecture")
    rlt_alpha: float = _f(0.01, "RLT: weight of the min (r_SS) / max (r_KL) term beside the mean over tokens "
                                "(authors' 0.01)")
    rlt_lambda: float = _f(3.0, "RLT: r = r_SS - lambda * r_KL (authors' 3)")
    eps_clip: float = _f(0.2, "PPO ratio clip below 1 (eps_low)")
    eps_clip_high: float = _f(0.28, "PPO clip (high side, DAPO clip-higher)")
    eps_clip_c: Optional[float] = _f(3.0, "dual-clip constant for negative advantages (verl's default 3.0; 0 disables)")
    loss_agg_mode: str = _f("token-mean", "how per-token losses are averaged",
                            choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"))
    tis_clip: float = _f(2.0, "truncated importance-sampling cap between rollout and trainer log-probs (0: off)")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient (methods with an entropy bonus, grpo_eb, default "
                                  "to 0.001)")
    kl_coef: float = _f(0.0, "reference-KL coefficient; > 0 keeps the reference policy (the starting weights, or "
                             "--ref-load) in host memory and adds one no-grad pass over the student rows per step")
    kl_type: str = _f("k3", "estimator of the reference KL term", choices=("k1", "k3"))
    ref_load: Optional[str] = _f(None, "reference policy of the KL term (needs --kl-coef > 0) when it is not the "
                                       "starting weights: a megatron-rlrt checkpoint (tools/convert_hf_to_megatron.py "
                                       "output or a training iter_N/, any TP/PP) or a Hugging Face Qwen3 directory "
                                       "of the same architecture")
    ref_update_interval: Optional[int] = _f(None, "every N RL steps, move the KL term's reference policy to the "
                                                  "current weights: ref <- (1 - m) ref + m policy with m = "
                                                  "--ref-update-mix (TRL's sync_ref_model / ref_model_sync_steps; "
                                                  "0: never; default per method: 32 for rlt, as the RLT authors' "
                                                  "run, 0 otherwise); saved in checkpoints, needs --kl-coef > 0")
    ref_update_mix: Optional[float] = _f(None, "weight m of the current policy in a --ref-update-interval update "
                                               "(TRL's ref_model_mixup_alpha; 1: copy; default per method: 0.9 "
                                               "for rlt, as the RLT authors' run, 1 otherwise)")
    distill_topk: int = _f(100, "top-K of the distillation loss (sdpo/srpo/opsd)")
    distill_alpha: float = _f(0.5, "generalized JSD alpha (0: forward KL, 1: reverse KL)")
    distill_coef: float = _f(1.0, "weight of the distillation loss")
    srpo_entropy_beta: float = _f(0.0, "SRPO entropy-aware weight beta")

    # ---- reward and data -------------------------------------------------------------------
    reward: str = _f("auto", "verifier by name: math (math-verify), reasoning_gym, auto (per row's 'verifier' "
                             "column), or any name registered with megatron_rlrt.reward.register_reward",
                     registry="rewards")
    plugins: Optional[str] = _f(None, "comma-separated Python modules or .py files imported before the config is "
                                      "checked; they register methods, advantage estimators, rollout engines or "
                                      "verifiers (algorithms.register_method/register_advantage, "
                                      "rollout.registry.register_engine, reward.register_reward)")
    reward_timeout: float = _f(10.0, "hard per-item scoring timeout in seconds (the item scores 0)")
    reward_workers: Optional[int] = _f(None, "scoring processes (default: min(8, cpus))")
    prompt_data: Optional[str] = _f(None, "training prompts (.jsonl / .parquet; DAPO-Math-17k, MATH and our own "
                                          "layouts are detected)")
    input_key: Optional[str] = _f(None, "prompt column (default: detected)")
    label_key: Optional[str] = _f(None, "answer column (default: detected)")
    solution_key: Optional[str] = _f(None, "reference solution column (default: detected)")
    apply_chat_template: bool = _f(True, "render prompts through the tokenizer's chat template")
    enable_thinking: Optional[bool] = _f(None, "Qwen3 thinking mode in the chat template (default: template default)")
    system_prompt: Optional[str] = _f(None, "system message for every prompt")
    instruction: Optional[str] = _f(None, "text appended to every prompt, e.g. 'Put your final answer within "
                                          "\\boxed{}.'")
    eval_data: Optional[str] = _f(None, "held-out prompts evaluated before training, every --eval-interval steps "
                                        "and at the end")
    eval_interval: int = _f(0, "evaluate every N RL steps (0: only before and after training)")
    eval_n_samples: int = _f(4, "samples per held-out prompt (avg@k and pass@k)")
    eval_temperature: float = _f(1.0, "sampling temperature for evaluation")
    eval_max_prompts: Optional[int] = _f(None, "evaluate on at most this many held-out prompts")

    # ---- logging ---------------------------------------------------------------------------
    log_interval: int = _f(1, "print a metrics line every N RL steps")
    tensorboard: bool = _f(True, "write TensorBoard event files to <save>/tensorboard")
    wandb_project: Optional[str] = _f(None, "log to Weights & Biases under this project (needs wandb)")
    progress: bool = _f(True, "progress bars per phase on rank 0")

    config: Optional[str] = _f(None, "YAML recipe with any of these options (command-line flags override it)")

    # ------------------------------------------------------------------------------------------
    @property
    def layout(self):
        from megatron_rlrt.parallel import ParallelLayout

        return ParallelLayout(self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                              self.virtual_pipeline_model_parallel_size, self.context_parallel_size)

    def recompute_options(self) -> dict:
        """The recompute keywords of ``models.qwen3.transformer_config`` (Megatron-LM's names)."""
        return dict(recompute_granularity=self.recompute_granularity, recompute_method=self.recompute_method,
                    recompute_num_layers=self.recompute_num_layers)

    @property
    def samples_per_step(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def optimizer_steps_per_rl_step(self) -> int:
        return self.samples_per_step // (self.global_batch_size or self.samples_per_step)

    def resolved_std_normalize(self) -> bool:
        from megatron_rlrt.algorithms import get_method

        return get_method(self.advantage_estimator).std_normalize if self.std_normalize is None else self.std_normalize

    def resolved_ref_update(self) -> tuple[int, float]:
        """(interval, mix) of the reference-policy updates; interval 0 (or no KL term): never."""
        from megatron_rlrt.algorithms import get_method

        method = get_method(self.advantage_estimator)
        interval = method.ref_update_interval if self.ref_update_interval is None else self.ref_update_interval
        mix = method.ref_update_mix if self.ref_update_mix is None else self.ref_update_mix
        return (interval if self.kl_coef > 0 else 0), mix

    def resolved_teacher_context(self) -> str:
        if self.teacher_context:
            return self.teacher_context
        from megatron_rlrt.algorithms import get_method

        return {"peer": "peer", "reference_answer": "answer", "reference_solution": "reference",
                "none": "peer"}[get_method(self.advantage_estimator).context]

    def resolved_teacher_exposure(self) -> str:
        if self.teacher_exposure:
            return self.teacher_exposure
        from megatron_rlrt.algorithms import get_method

        return get_method(self.advantage_estimator).exposure

    def atesd_config(self):
        from megatron_rlrt.algorithms.atesd import AtesdConfig

        return AtesdConfig(hold_window=self.atesd_hold_window, discount=self.atesd_discount, lr=self.atesd_lr,
                           horizon=self.atesd_horizon, seed=self.seed)

    def validate(self, world_size: int | None = None, capability=None) -> "Config":
        """Raise ``ConfigError`` listing every problem, each naming its flags (the checks live in
        ``config_checks.py``). ``capability``: the machine the FP8 rules check against."""
        from megatron_rlrt.config_checks import config_problems

        problems = config_problems(self, world_size, capability)
        if len(problems) == 1:
            raise ConfigError(f"invalid configuration: {problems[0]}")
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """Invalid flags or recipe, found before any work starts."""


_PER_METHOD = ("std_normalize", "teacher_context", "enable_thinking")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _field_type(f: dataclasses.Field):
    hint = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if name in hint:
            return typ
    raise TypeError(f"unsupported config field type {f.type} for {f.name}")


class _Parser(argparse.ArgumentParser):
    """A flag error is a ConfigError (one line, printed by rank 0 only), not usage text from every rank."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """argparse for every Config field; --help documents each one with its default."""
    p = _Parser(
        prog="megatron-rlrt-train", allow_abbrev=False,  # a typo must not silently set another flag
        description="RL post-training (RLRT, GRPO, RLSD, SDPO, SRPO, OPSD) of Qwen3 on megatron-core. "
                    "Run under torchrun for several ranks (examples/train_rlrt_qwen3.sh).",
    )
    for f in dataclasses.fields(Config):
        typ, meta = _field_type(f), f.metadata
        flag = "--" + _flag(f.name)
        shown = "per method" if f.default is None and f.name in _PER_METHOD else f.default
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{meta['help']} [default: {shown}]")
        if typ is bool:
            if f.default is None:  # tri-state: --flag / --no-flag, absent = per-method default
                group = p.add_mutually_exclusive_group()
                group.add_argument(flag, action="store_true", **kwargs)
                group.add_argument("--no-" + _flag(f.name), dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                   help=f"turn off {flag}")
                continue
            if f.default is True:
                p.add_argument("--no-" + _flag(f.name), action="store_false", **{**kwargs, "help": f"disable: {meta['help']}"})
                continue
            p.add_argument(flag, action="store_true", **kwargs)
            continue
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("registry"):  # not argparse choices: a --plugins module may register more names
            kwargs["help"] = f"{meta['help']}; registered: {', '.join(registered_names(meta['registry']))} " \
                             f"[default: {shown}]"
        p.add_argument(flag, type=typ, metavar=typ.__name__.upper(), **kwargs)
    return p


def load_recipe(path: str) -> dict:
    """Read a YAML recipe; keys may be written with '-' or '_'. Unknown keys are an error."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a directory, expected a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(Config)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown option {key!r} (see --help)")
        if value is not None:
            typ = _field_type(known[name])
            if typ is int and (isinstance(value, bool) or not isinstance(value, (int, str))):
                raise ConfigError(f"--config {path}: option {key!r} = {value!r}: expected an integer")
            if typ is float and isinstance(value, bool):
                raise ConfigError(f"--config {path}: option {key!r} = {value!r}: expected a number")
            try:
                value = _parse_bool(str(value)) if typ is bool and not isinstance(value, bool) else typ(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"--config {path}: option {key!r}: {exc}") from None
            choices = known[name].metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"--config {path}: option {key!r} = {value!r}, expected one of {list(choices)}")
        out[name] = value
    return out


def parse_config(argv=None) -> Config:
    """Defaults < --config recipe < command-line flags."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    if args.get("config"):
        values.update(load_recipe(args["config"]))
    values.update(args)
    import_plugins(values.get("plugins"))
    from megatron_rlrt.algorithms.methods import ENTROPY_BONUS_COEF, METHODS

    method = METHODS.get(values.get("advantage_estimator", Config.advantage_estimator))
    if method is not None and method.entropy_bonus:  # e.g. grpo_eb: the entropy bonus is the method
        values.setdefault("entropy_coef", ENTROPY_BONUS_COEF)
    return Config(**values)
