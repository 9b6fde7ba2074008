"""Training precision: Transformer Engine FP8, checked before any work, handed to megatron-core.

What runs in FP8 (the policy; README "Precision"):

* The transformer layers' Linear GEMMs (TE ``Linear``/``LayerNormLinear``: QKV, attention
  output, MLP fc1/fc2) run in FP8 under ``fp8_autocast``. megatron-core's ``TransformerBlock``
  enters the autocast itself from ``TransformerConfig.fp8`` (per layer for every recipe but
  ``delayed``, so ``--first-last-layers-bf16`` can keep the first/last N layers in bf16).
* The embedding and the LM head stay bf16 (they are outside the block's autocast; we never
  set ``fp8_output_proj``), as slime documents for its FP8 runs; norms, softmax and rotary
  stay bf16/fp32 as TE runs them.
* Log-softmax, log-probs, entropy and top-K run in fp32 in our ops (``megatron_rlrt.ops``):
  the LM-head logits are upcast before any reduction.
* The no-grad pass that scores student AND teacher rows runs through the same chunks and the
  same ``TransformerConfig`` as the training pass, so it is in the same precision: D_t =
  log P_S - log P_T compares identical kernels (the two rows of a sample share one packed
  forward). ``--logprob-precision bf16`` forces that pass to bf16 (the training pass stays FP8).

Flag names and values are Megatron-LM's (``megatron/training/arguments.py`` generates them
from ``TransformerConfig``; ``--fp8-param-gather`` becomes ``fp8_param``). Validation needs
the hardware only through ``Capability``, which tests construct by hand: every rule below is
tested on a CPU-only machine.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Optional

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_AMAX_ALGOS = ("most_recent", "max")
LOGPROB_PRECISIONS = ("train", "bf16")

# Smallest compute capability per recipe: FP8 tensor cores start at Ada (sm_89); TE's
# Float8BlockScaling needs Hopper (sm_90); MXFP8 block scaling is Blackwell (sm_100) hardware.
MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}
# Transformer Engine versions that provide the recipe (megatron.core.fp8_utils.get_fp8_recipe).
MIN_TE_VERSION = {"delayed": "1.0", "tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0", "mxfp8": "2.1.0"}

# Length multiple of the tokens one rank's FP8 GEMM sees (its M dimension). TE needs 16 for
# per-tensor scaling; MXFP8 scales blocks of 32; blockwise scales 1x128 / 128x128 tiles.
# NeMo-RL (_get_pack_sequence_parameters_for_megatron) and verl pad packed sequences the same way.
FP8_PAD_DIVISOR = {"delayed": 16, "tensorwise": 16, "blockwise": 128, "mxfp8": 32}


@dataclass(frozen=True)
class Capability:
    """What the FP8 checks need to know about the machine. ``detect()`` reads it; tests build it."""

    has_cuda: bool = False
    compute_capability: Optional[tuple[int, int]] = None  # of the GPU this rank uses
    device_name: str = "cpu"
    te_version: Optional[str] = None  # None: transformer_engine.pytorch does not import

    @property
    def has_transformer_engine(self) -> bool:
        return self.te_version is not None

    @classmethod
    def detect(cls) -> "Capability":
        """This rank's GPU and Transformer Engine as ``platform.detect`` sees them (the probe the
        model build uses), plus the compute capability and TE version the FP8 rules need."""
        import torch

        from megatron_rlrt.platform import detect

        platform = detect()
        if not platform.is_cuda:
            return cls()
        te = None
        if platform.has_transformer_engine:
            try:
                te = importlib.metadata.version("transformer_engine")
            except importlib.metadata.PackageNotFoundError:
                te = "unknown"
        return cls(True, tuple(torch.cuda.get_device_capability(platform.device)),
                   torch.cuda.get_device_name(platform.device), te)


@dataclass(frozen=True)
class Fp8Options:
    """The FP8 flags of one run (``Config`` fields of the same names)."""

    fp8_format: Optional[str] = None  # None: no FP8
    fp8_recipe: str = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"
    fp8_wgrad: bool = True
    fp8_param_gather: bool = False
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1

    @property
    def enabled(self) -> bool:
        return self.fp8_format is not None

    @classmethod
    def from_config(cls, cfg: Any) -> "Fp8Options":
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})

    def transformer_config_kwargs(self) -> dict:
        """The ``TransformerConfig`` fields these flags set (empty without FP8)."""
        if not self.enabled:
            return {}
        return dict(
            fp8=self.fp8_format,
            fp8_recipe=self.fp8_recipe,
            fp8_margin=self.fp8_margin,
            fp8_amax_history_len=self.fp8_amax_history_len,
            fp8_amax_compute_algo=self.fp8_amax_compute_algo,
            fp8_wgrad=self.fp8_wgrad,
            fp8_param=self.fp8_param_gather,
            first_last_layers_bf16=self.first_last_layers_bf16,
            num_layers_at_start_in_bf16=self.num_layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=self.num_layers_at_end_in_bf16,
        )

    def pad_divisor(self) -> int:
        """Multiple of the token count one rank's FP8 GEMMs need (1 without FP8)."""
        return FP8_PAD_DIVISOR[self.fp8_recipe] if self.enabled else 1

    def describe(self) -> str:
        if not self.enabled:
            return "bf16/fp32 (no FP8)"
        bf16_layers = (f", first {self.num_layers_at_start_in_bf16} / last {self.num_layers_at_end_in_bf16} "
                       "layers bf16" if self.first_last_layers_bf16 else "")
        return f"FP8 {self.fp8_format} {self.fp8_recipe}{bf16_layers}"


def check(cfg: Any, capability: Optional[Capability] = None) -> list[str]:
    """Problems with the precision flags of ``cfg`` (a ``Config``), each naming its flags.

    ``capability``: the machine (default: this one). Hardware is checked only when FP8 is on.
    """
    opts = Fp8Options.from_config(cfg)
    problems: list[str] = check_rollout(cfg)

    def need(cond, msg):
        if not cond:
            problems.append(msg)

    need(opts.fp8_format is None or opts.fp8_format in FP8_FORMATS,
         f"--fp8-format {opts.fp8_format!r}: expected one of {list(FP8_FORMATS)}")
    need(opts.fp8_recipe in FP8_RECIPES, f"--fp8-recipe {opts.fp8_recipe!r}: expected one of {list(FP8_RECIPES)}")
    need(opts.fp8_amax_compute_algo in FP8_AMAX_ALGOS,
         f"--fp8-amax-compute-algo {opts.fp8_amax_compute_algo!r}: expected one of {list(FP8_AMAX_ALGOS)}")
    need(opts.fp8_amax_history_len >= 1, f"--fp8-amax-history-len {opts.fp8_amax_history_len} must be >= 1")
    need(opts.fp8_margin >= 0, f"--fp8-margin {opts.fp8_margin} must be >= 0")
    for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
        need(getattr(opts, name) >= 0, f"--{name.replace('_', '-')} {getattr(opts, name)} must be >= 0")
    logprob_precision = getattr(cfg, "logprob_precision", "train")
    need(logprob_precision in LOGPROB_PRECISIONS,
         f"--logprob-precision {logprob_precision!r}: expected one of {list(LOGPROB_PRECISIONS)}")
    if not opts.enabled:
        for flag, on in (("--fp8-param-gather", opts.fp8_param_gather),
                         ("--first-last-layers-bf16", opts.first_last_layers_bf16),
                         ("--logprob-precision bf16", logprob_precision == "bf16")):
            need(not on, f"{flag} applies to FP8 training only; set --fp8-format e4m3|hybrid or drop it")
        return problems
    if problems:  # unknown names: the rules below would only repeat them
        return problems

    fmt = f"--fp8-format {opts.fp8_format} --fp8-recipe {opts.fp8_recipe}"
    need(getattr(cfg, "bf16", False), f"{fmt} needs --bf16 (FP8 GEMMs inside a bf16 model: the embedding, LM head "
                                      "and norms stay bf16)")
    need(not (opts.first_last_layers_bf16 and opts.fp8_recipe == "delayed"),
         "--first-last-layers-bf16 does not work with --fp8-recipe delayed (delayed scaling reduces amax over the "
         "whole block; megatron-core refuses it): use tensorwise, blockwise or mxfp8")
    need(not opts.fp8_param_gather or getattr(cfg, "use_distributed_optimizer", False),
         "--fp8-param-gather needs --use-distributed-optimizer (the optimizer keeps the fp32 master shard and "
         "all-gathers FP8 parameters; Megatron-LM allows it with the distributed optimizer only)")
    need(not (opts.fp8_param_gather and logprob_precision == "bf16"),
         "--logprob-precision bf16 cannot be used with --fp8-param-gather: the parameters are stored in FP8, so "
         "there are no bf16 weights to run the log-prob pass with")

    cap = capability if capability is not None else Capability.detect()
    if not cap.has_cuda:
        problems.append(f"{fmt}: FP8 needs an NVIDIA GPU with Transformer Engine; this machine has no CUDA device "
                        "(drop --fp8-format to train in bf16/fp32)")
        return problems
    if not cap.has_transformer_engine:
        problems.append(f"{fmt}: FP8 needs Transformer Engine (transformer_engine.pytorch does not import on "
                        f"{cap.device_name}); use an image with TE (Dockerfile) or drop --fp8-format")
        return problems
    need_cc = MIN_CAPABILITY[opts.fp8_recipe]
    have_cc = cap.compute_capability or (0, 0)
    if have_cc < need_cc:
        what = {"blockwise": "Hopper (sm_90) or newer", "mxfp8": "Blackwell (sm_100) or newer"}.get(
            opts.fp8_recipe, "Ada/Hopper (sm_89) or newer")
        hint = " (use --fp8-recipe blockwise or tensorwise on Hopper)" if opts.fp8_recipe == "mxfp8" else ""
        problems.append(f"{fmt} needs {what}; {cap.device_name} is sm_{have_cc[0]}{have_cc[1]}{hint}")
    if cap.te_version not in (None, "unknown") and _version_tuple(cap.te_version) < _version_tuple(
            MIN_TE_VERSION[opts.fp8_recipe]):
        problems.append(f"{fmt} needs Transformer Engine >= {MIN_TE_VERSION[opts.fp8_recipe]} "
                        f"(installed: {cap.te_version})")
    return problems


def check_rollout(cfg: Any) -> list[str]:
    """Problems with ``--rollout-quantization`` / ``--rollout-model-path`` (servers' precision)."""
    import json
    import os
    import warnings

    quant = getattr(cfg, "rollout_quantization", None)
    model_path = getattr(cfg, "rollout_model_path", None)
    problems = []
    if model_path is not None and not os.path.isfile(os.path.join(model_path, "config.json")):
        problems.append(f"--rollout-model-path {model_path}: no config.json there (expected a Hugging Face checkpoint)")
        model_path = None
    if quant is None:
        return problems
    if quant != "fp8":
        return problems + [f"--rollout-quantization {quant!r}: expected fp8"]
    if getattr(cfg, "rollout_engine", "hf") not in ("sglang", "vllm"):
        problems.append(f"--rollout-quantization fp8 needs --rollout-engine sglang or vllm (the {cfg.rollout_engine!r} "
                        "engine generates in the trainer's precision)")
    if model_path is None and not getattr(cfg, "rollout_urls", None) and getattr(cfg, "rollout_model_path", None) is None:
        problems.append("--rollout-quantization fp8 needs --rollout-model-path: a blockwise-FP8 checkpoint of the same "
                        "model (e.g. Qwen/Qwen3-8B-FP8) for the servers to start from, so that their quantization_config "
                        "matches the FP8 weights each update sends")
    if model_path is not None:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as f:
            qc = (json.load(f) or {}).get("quantization_config") or {}
        if qc.get("quant_method") != "fp8" or list(qc.get("weight_block_size") or []) != [128, 128]:
            problems.append(f"--rollout-model-path {model_path}: config.json's quantization_config is {qc or None}; "
                            "--rollout-quantization fp8 needs a blockwise-FP8 checkpoint (quant_method fp8, "
                            "weight_block_size [128, 128])")
    if not getattr(cfg, "tis_clip", 0):
        warnings.warn("--rollout-quantization fp8 with --tis-clip 0: the FP8 rollout policy differs from the trainer's; "
                      "verl reports a clear accuracy drop for FP8 rollouts without truncated importance sampling",
                      stacklevel=2)
    return problems


def check_layers(opts: Fp8Options, num_layers: int, pipeline_model_parallel_size: int = 1) -> None:
    """``--num-layers-at-{start,end}-in-bf16`` against the model (megatron-core's rule, in our flags'
    words): each count must fit in one pipeline stage."""
    if not (opts.enabled and opts.first_last_layers_bf16):
        return
    per_stage = num_layers // max(1, pipeline_model_parallel_size)
    bad = [f"--{name.replace('_', '-')} {getattr(opts, name)}"
           for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")
           if not 0 <= getattr(opts, name) <= per_stage]
    if bad:
        raise ValueError(f"{' and '.join(bad)}: must be between 0 and the layers per pipeline stage ({per_stage} = "
                         f"{num_layers} layers / --pipeline-model-parallel-size {pipeline_model_parallel_size})")


@contextlib.contextmanager
def logprob_precision(config, precision: str = "train"):
    """Context for the no-grad student+teacher pass: ``train`` changes nothing (same precision
    as training, D_t compares identical kernels); ``bf16`` switches FP8 off for the pass only.

    megatron-core reads ``config.fp8`` at every forward (``TransformerBlock`` enters TE's
    ``fp8_autocast`` from it), and every module of a model holds the same config object, so
    clearing the field for the pass runs the TE Linear layers in bf16. Not valid with FP8
    parameters (``--fp8-param-gather``; refused by ``check``)."""
    if precision == "train" or not getattr(config, "fp8", None):
        yield config
        return
    if precision != "bf16":
        raise ValueError(f"logprob precision {precision!r}: expected one of {list(LOGPROB_PRECISIONS)}")
    if getattr(config, "fp8_param", False):
        raise ValueError("--logprob-precision bf16 cannot be used with --fp8-param-gather (FP8 parameters)")
    saved = config.fp8
    config.fp8 = None
    try:
        yield config
    finally:
        config.fp8 = saved


def sequence_shards(tensor_model_parallel_size: int = 1, sequence_parallel: bool = False,
                    context_parallel_size: int = 1) -> int:
    """Pieces a packed sequence is cut into before a rank's GEMMs see it: TP ranks with sequence
    parallelism, and 2 x CP chunks (load-balanced causal context parallelism)."""
    shards = tensor_model_parallel_size if sequence_parallel and tensor_model_parallel_size > 1 else 1
    return shards * (2 * context_parallel_size if context_parallel_size > 1 else 1)


def fp8_pad_multiple(opts: Fp8Options, shards: int = 1) -> int:
    """Multiple the packed length needs so that every shard's token count is a multiple of the
    FP8 divisor: divisor x shards (NeMo-RL's ``pad_packed_seq_to_multiple_of``). 1 without FP8."""
    return opts.pad_divisor() * shards if opts.enabled else 1


def pack_multiple(cfg: Any) -> int:
    """``pad_to_multiple_of`` of the trainer's packed micro-batches for ``cfg``: the sequence-
    parallel multiple combined with the FP8 multiple over the sequence's shards (the per-row
    context-parallel padding is the packer's own, ``pack_rows(segment_multiple=...)``)."""
    from megatron_rlrt.packing import pad_multiple

    tp, sp = cfg.tensor_model_parallel_size, cfg.sequence_parallel
    shards = sequence_shards(tp, sp, cfg.context_parallel_size)
    return pad_multiple(tp if sp else 1, fp8_pad_multiple(Fp8Options.from_config(cfg), shards))


def _version_tuple(text: str) -> tuple:
    """(major, minor, micro) of a version string; pre-release/local tags ("2.3.0.dev0+abc") dropped."""
    from packaging.version import Version

    return Version(text).release
