"""The one Hugging Face <-> Megatron parameter mapping for Qwen3.

Used by the checkpoint converters (tools/) and by weight sync to rollout engines, so a name
or layout bug cannot hide in one and not the other. Cross-checked against mbridge's
Qwen3Bridge in tests/test_mapping.py (mbridge serves only the TE layer spec, so it cannot be
used directly on CPU).

Megatron names here are *canonical*: global layer numbers and local-spec module names.
``canonical_name`` converts a rank's own parameter names (local layer numbers, TE or local
spec) into them.

Layouts (Megatron side, full = before tensor-parallel splitting):
- ``linear_qkv``: rows grouped per KV head: for each of the ``ng`` query groups,
  [q rows of its ``heads/ng`` heads, k rows, v rows], each ``head_dim`` per head. A TP shard is
  a contiguous block of whole groups.
- ``linear_fc1``: [gate; up]. A TP shard is [gate block r; up block r].
- column-parallel weights (qkv, fc1, embedding, output layer) split dim 0; row-parallel
  (linear_proj, linear_fc2) split dim 1; norms are replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from megatron_rlrt.models.qwen3 import Qwen3Spec

# TE's fused norm+linear modules keep the norm weight inside the linear.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron parameter and the Hugging Face tensors it is made of."""

    megatron_name: str
    hf_names: tuple[str, ...]
    kind: str  # "direct" | "qkv" | "gate_up"
    tp_dim: int | None  # dim split across tensor-parallel ranks; None = replicated


def _layer_mappings(i: int) -> list[ParamMapping]:
    m, h = f"decoder.layers.{i}", f"model.layers.{i}"
    return [
        ParamMapping(f"{m}.input_layernorm.weight", (f"{h}.input_layernorm.weight",), "direct", None),
        ParamMapping(
            f"{m}.self_attention.linear_qkv.weight",
            (f"{h}.self_attn.q_proj.weight", f"{h}.self_attn.k_proj.weight", f"{h}.self_attn.v_proj.weight"),
            "qkv", 0,
        ),
        ParamMapping(f"{m}.self_attention.q_layernorm.weight", (f"{h}.self_attn.q_norm.weight",), "direct", None),
        ParamMapping(f"{m}.self_attention.k_layernorm.weight", (f"{h}.self_attn.k_norm.weight",), "direct", None),
        ParamMapping(f"{m}.self_attention.linear_proj.weight", (f"{h}.self_attn.o_proj.weight",), "direct", 1),
        ParamMapping(f"{m}.pre_mlp_layernorm.weight", (f"{h}.post_attention_layernorm.weight",), "direct", None),
        ParamMapping(
            f"{m}.mlp.linear_fc1.weight", (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"), "gate_up", 0
        ),
        ParamMapping(f"{m}.mlp.linear_fc2.weight", (f"{h}.mlp.down_proj.weight",), "direct", 1),
    ]


def qwen3_mappings(spec: Qwen3Spec) -> list[ParamMapping]:
    """Every Megatron parameter of ``spec`` in model order (embedding, layers, norm, head)."""
    out = [ParamMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "direct", 0)]
    for i in range(spec.num_hidden_layers):
        out.extend(_layer_mappings(i))
    out.append(ParamMapping("decoder.final_layernorm.weight", ("model.norm.weight",), "direct", None))
    if not spec.tie_word_embeddings:
        out.append(ParamMapping("output_layer.weight", ("lm_head.weight",), "direct", 0))
    return out


def mapping_by_name(spec: Qwen3Spec) -> dict[str, ParamMapping]:
    return {m.megatron_name: m for m in qwen3_mappings(spec)}


def expected_hf_names(spec: Qwen3Spec) -> list[str]:
    return [n for m in qwen3_mappings(spec) for n in m.hf_names]


def canonical_name(local_name: str, layer_offset: int = 0) -> str:
    """A rank's parameter name -> canonical name (global layer number, local-spec modules).

    ``layer_offset`` is the global index of this model chunk's first layer (pipeline stage).
    """
    match = _LAYER_RE.match(local_name)
    if not match:
        return local_name
    index, rest = int(match.group(1)), match.group(2)
    return f"decoder.layers.{index + layer_offset}.{_TE_TO_LOCAL.get(rest, rest)}"


def layer_offset(model_chunk: torch.nn.Module) -> int:
    """Global index of the first transformer layer held by this model chunk."""
    layers = model_chunk.decoder.layers if hasattr(model_chunk, "decoder") else []
    return layers[0].layer_number - 1 if len(layers) else 0


# --- tensor layouts ---------------------------------------------------------------------


def _qkv_dims(spec: Qwen3Spec) -> tuple[int, int, int]:
    groups = spec.num_key_value_heads
    return groups, spec.num_attention_heads // groups * spec.head_dim, spec.head_dim


def hf_to_megatron(mapping: ParamMapping, hf_tensors: Sequence[torch.Tensor], spec: Qwen3Spec) -> torch.Tensor:
    """Full (unsplit) Megatron tensor from its Hugging Face tensors."""
    if mapping.kind == "direct":
        return hf_tensors[0]
    if mapping.kind == "gate_up":
        return torch.cat(list(hf_tensors), dim=0)
    q, k, v = hf_tensors
    groups, q_rows, head_dim = _qkv_dims(spec)
    hidden = q.shape[-1]
    qkv = torch.cat([q.reshape(groups, q_rows, hidden), k.reshape(groups, head_dim, hidden),
                     v.reshape(groups, head_dim, hidden)], dim=1)
    return qkv.reshape(-1, hidden)


def megatron_to_hf(mapping: ParamMapping, full: torch.Tensor, spec: Qwen3Spec) -> list[torch.Tensor]:
    """Hugging Face tensors (in ``mapping.hf_names`` order) from a full Megatron tensor."""
    if mapping.kind == "direct":
        return [full]
    if mapping.kind == "gate_up":
        return list(full.chunk(2, dim=0))
    groups, q_rows, head_dim = _qkv_dims(spec)
    hidden = full.shape[-1]
    grouped = full.reshape(groups, q_rows + 2 * head_dim, hidden)
    q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
    return [q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)]


def tp_shard(mapping: ParamMapping, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This tensor-parallel rank's slice of a full Megatron tensor."""
    if mapping.tp_dim is None or tp_size == 1:
        return full
    if mapping.kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=mapping.tp_dim)[tp_rank]


def tp_merge(mapping: ParamMapping, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``tp_shard`` given every rank's slice in rank order."""
    if mapping.tp_dim is None or len(shards) == 1:
        return shards[0]
    if mapping.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=mapping.tp_dim)


# --- walking a model ----------------------------------------------------------------------


def named_model_params(
    model_chunks: Iterable[torch.nn.Module], spec: Qwen3Spec
) -> Iterator[tuple[ParamMapping, torch.nn.Parameter]]:
    """(mapping, parameter) for every parameter this rank holds, in canonical names.

    The last stage's copy of a tied output layer is skipped: its value is the embedding's.
    Unknown parameter names raise, so a megatron upgrade that renames a module fails here
    rather than silently dropping a weight.
    """
    by_name = mapping_by_name(spec)
    for chunk in model_chunks:
        chunk = unwrap(chunk)
        offset = layer_offset(chunk)
        for local_name, param in chunk.named_parameters():
            name = canonical_name(local_name, offset)
            if name == "output_layer.weight" and spec.tie_word_embeddings:
                continue
            if name not in by_name:
                raise KeyError(f"megatron parameter {local_name!r} (canonical {name!r}) has no Qwen3 mapping")
            yield by_name[name], param


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
