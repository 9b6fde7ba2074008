"""Qwen3 on megatron-core: architecture read from a Hugging Face ``config.json``.

Qwen3 dense = RMSNorm (pre-norm) + SwiGLU MLP + GQA attention with QK-RMSNorm and RoPE, no
biases, ``head_dim`` set independently of hidden/heads (Qwen3-4B: hidden 2560, 32 heads,
head_dim 128), tied or untied embeddings. Megatron expresses all of it with stock modules:
``qk_layernorm``, ``kv_channels=head_dim``, ``num_query_groups=num_key_value_heads``,
``gated_linear_unit`` + silu.

Layer spec: Transformer Engine when TE imports (GPU images), megatron's local spec
otherwise. Parameter names differ only in where the pre-attention / pre-MLP norms live;
``models/mapping.py`` folds both into one naming.

Qwen3-MoE: ``QWEN3_MOE_ARCHITECTURES`` is recognised and refused with a clear message. Adding
it means: num_moe_experts / moe_router_topk / moe_ffn_hidden_size in ``transformer_config``,
``get_gpt_decoder_block_spec`` for the layer spec, and expert entries in ``mapping.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megatron_rlrt.platform import setup_megatron
from megatron_rlrt.precision import Fp8Options, check_layers

QWEN3_ARCHITECTURES = ("Qwen3ForCausalLM",)
QWEN3_MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM",)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """One stderr line per distinct message, from rank 0 only (configs are read several times)."""
    import sys

    if message not in _WARNED and os.environ.get("RANK", "0") == "0":
        _WARNED.add(message)
        print(message, file=sys.stderr, flush=True)


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be used, with the file and the reason."""


@dataclass(frozen=True)
class Qwen3Spec:
    """The architecture of one dense Qwen3 model (what megatron needs from config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str = "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "Qwen3Spec":
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if any(a in QWEN3_MOE_ARCHITECTURES for a in archs) or model_type == "qwen3_moe":
            raise CheckpointError(
                f"{source}: Qwen3-MoE ({archs or model_type}) is not supported yet; only dense "
                f"{QWEN3_ARCHITECTURES[0]} is (see megatron_rlrt/models/qwen3.py for what MoE needs)"
            )
        if model_type != "qwen3" and not any(a in QWEN3_ARCHITECTURES for a in archs):
            raise CheckpointError(
                f"{source}: unsupported architecture {archs or None} (model_type={model_type!r}); "
                f"expected {QWEN3_ARCHITECTURES[0]} (model_type 'qwen3')"
            )
        if (archs and not any(a in QWEN3_ARCHITECTURES for a in archs)) or (model_type and model_type != "qwen3"):
            _warn_once(f"WARNING: {source}: architectures {archs or None} and model_type {model_type!r} disagree; "
                       f"reading it as dense Qwen3 ({QWEN3_ARCHITECTURES[0]}, model_type 'qwen3'): check that this "
                       "is the model you meant (a mislabelled Llama/Qwen2 would load with wrong results)")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "rms_norm_eps")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise CheckpointError(f"{source}: missing required field(s) {missing}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported (only default RoPE)")
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta"))
        if rope_theta is None:
            raise CheckpointError(f"{source}: no rope_theta (neither top level nor in rope_parameters)")
        if cfg.get("attention_bias", False):
            raise CheckpointError(f"{source}: attention_bias=true is not Qwen3 and is not supported")
        if cfg.get("use_sliding_window", False):
            raise CheckpointError(f"{source}: sliding-window attention is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {cfg['hidden_act']!r}; Qwen3 uses silu")
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
        if dtype not in _DTYPES:
            raise CheckpointError(f"{source}: dtype {dtype!r} not one of {sorted(_DTYPES)}")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(heads),
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=dtype,
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> "Qwen3Spec":
        return cls.from_hf_config(read_hf_config(path), os.path.join(path, "config.json"))

    def check_parallel(self, tp: int, pp: int, vpp: int | None = None) -> None:
        """Raise a clear error when a TP/PP layout cannot split this model."""
        problems = []
        for what, n in (("num_attention_heads", self.num_attention_heads),
                        ("num_key_value_heads", self.num_key_value_heads),
                        ("vocab_size", self.vocab_size),
                        ("intermediate_size", self.intermediate_size)):
            if n % tp:
                problems.append(f"{what}={n} is not divisible by --tensor-model-parallel-size {tp}")
        stages = pp * (vpp or 1)
        if self.num_hidden_layers % stages:
            problems.append(
                f"num_hidden_layers={self.num_hidden_layers} is not divisible by pipeline stages "
                f"{stages} (--pipeline-model-parallel-size {pp}"
                + (f" x --virtual-pipeline-model-parallel-size {vpp})" if vpp else ")")
            )
        if problems:
            raise ValueError("cannot split this Qwen3 model: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


def read_checkpoint_json(path: str):
    """A checkpoint's JSON file; CheckpointError naming it when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def read_hf_config(path: str) -> dict:
    """config.json of a Hugging Face checkpoint directory, with errors that name the file."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{cfg_path}: missing (a Hugging Face checkpoint needs config.json)")
    cfg = read_checkpoint_json(cfg_path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def transformer_config(
    spec: Qwen3Spec,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype | None = None,
    use_te: bool | None = None,
    perform_initialization: bool = True,
    recompute_granularity: str | None = None,
    fp8: Fp8Options | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    **overrides,
):
    """megatron-core TransformerConfig for ``spec`` on the current platform.

    ``fp8``: the run's FP8 flags (``precision.Fp8Options``), already validated against the
    machine by ``Config.validate``; they only set TransformerConfig fields, so this builds on
    any machine (megatron-core's own FP8 field checks run here too)."""
    platform = setup_megatron()
    from megatron.core.transformer import TransformerConfig

    use_te = platform.has_transformer_engine if use_te is None else use_te
    params_dtype = params_dtype or spec.torch_dtype
    on_gpu = platform.is_cuda
    spec.check_parallel(tensor_model_parallel_size, pipeline_model_parallel_size,
                        virtual_pipeline_model_parallel_size)
    kwargs = dict(
        num_layers=spec.num_hidden_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.intermediate_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_key_value_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        # TE's THD + CP works with p2p only (its all_gather/a2a modes refuse THD); the CPU's
        # PackedCoreAttention all-gathers K/V whatever this says
        cp_comm_type="p2p" if context_parallel_size > 1 else None,
        sequence_parallel=sequence_parallel and tensor_model_parallel_size > 1,
        variable_seq_lengths=True,  # RL batches change length every step (PP sends shapes first)
        moe_token_dispatcher_type="alltoall",  # the only dispatcher megatron allows with variable lengths
        use_cpu_initialization=not on_gpu,
        perform_initialization=perform_initialization,
        # The fused kernels need CUDA (and most need TE or apex).
        bias_activation_fusion=on_gpu and use_te,
        masked_softmax_fusion=on_gpu and use_te,
        bias_dropout_fusion=on_gpu and use_te,
        apply_rope_fusion=on_gpu and use_te,
        gradient_accumulation_fusion=on_gpu and use_te,
        persist_layer_norm=False,
        # Megatron-LM's flags; full recompute defaults to uniform, one layer per checkpoint
        recompute_granularity=recompute_granularity,
        recompute_method=(recompute_method or "uniform") if recompute_granularity == "full" else None,
        recompute_num_layers=(recompute_num_layers or 1) if recompute_granularity == "full" else None,
    )
    if recompute_granularity not in (None, "full", "selective"):
        raise ValueError(f"--recompute-granularity {recompute_granularity!r}; valid: full, selective")
    if recompute_granularity != "full" and (recompute_method or recompute_num_layers):
        raise ValueError("--recompute-method / --recompute-num-layers need --recompute-granularity full")
    if fp8 is not None:
        check_layers(fp8, spec.num_hidden_layers, pipeline_model_parallel_size)
        kwargs.update(fp8.transformer_config_kwargs())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(config, use_te: bool | None = None):
    """Megatron layer spec: TE modules when available, local (pure torch) modules otherwise."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    platform = setup_megatron()
    use_te = platform.has_transformer_engine if use_te is None else use_te
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    if getattr(config, "fp8", None):
        raise ValueError(f"fp8={config.fp8!r} needs Transformer Engine layers (TE Linear runs the FP8 GEMMs); "
                         "the local layer spec has none")
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    # megatron's local DotProductAttention needs an explicit [s, s] mask, refuses packed rows and
    # context parallelism: the local spec uses the mask-free packed attention instead
    from megatron_rlrt.models.packed_attention import PackedCoreAttention

    spec.submodules.self_attention.submodules.core_attention = PackedCoreAttention
    # megatron's WrappedTorchNorm refuses sequence parallelism; LocalRMSNorm is the same RMSNorm
    # with the weight mark that makes finalize_model_grads all-reduce its gradient over TP
    from megatron_rlrt.models.local_norm import LocalRMSNorm

    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = LocalRMSNorm
    layer.self_attention.submodules.q_layernorm = layer.self_attention.submodules.k_layernorm = LocalRMSNorm
    return spec


def block_spec(config, layer, vp_stage: int | None):
    """The decoder block of ``layer`` specs; on the local spec with its final norm a LocalRMSNorm
    (megatron's default for the local spec, WrappedTorchNorm, refuses sequence parallelism)."""
    from megatron_rlrt.models.local_norm import LocalRMSNorm

    if layer.submodules.input_layernorm is not LocalRMSNorm:
        return layer  # TE spec: TransformerBlock picks TENorm for the final norm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=LocalRMSNorm)


def model_provider(spec: Qwen3Spec, config, use_te: bool | None = None, parallel_output: bool = True
                   ) -> Callable[..., torch.nn.Module]:
    """A megatron-style provider ``(pre_process, post_process, vp_stage=None) -> GPTModel``."""

    def provide(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None):
        from megatron.core.models.gpt import GPTModel

        return GPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, layer_spec(config, use_te), vp_stage),
            vocab_size=spec.vocab_size,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=spec.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(spec.rope_theta),
            vp_stage=vp_stage,
        )

    return provide


def build_model(spec: Qwen3Spec, config, use_te: bool | None = None, parallel_output: bool = True
                ) -> list[torch.nn.Module]:
    """Model chunks for this rank (one per virtual pipeline stage), on this rank's device.

    Not wrapped in DDP: the trainer wraps; tools and inference use the chunks as they are.
    """
    from megatron.core import parallel_state

    provide = model_provider(spec, config, use_te, parallel_output)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = provide(pre_process=pre, post_process=post, vp_stage=stage)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
