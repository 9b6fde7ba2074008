"""Reading and writing Hugging Face Qwen3 checkpoint directories (safetensors).

A directory that ``transformers`` loads with ``from_pretrained``: config.json,
model.safetensors (or shards + model.safetensors.index.json), tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_rlrt.models.mapping import expected_hf_names
from megatron_rlrt.models.qwen3 import CheckpointError, Qwen3Spec

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied along with the weights so the result is a complete, loadable checkpoint.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        bins = [f for f in os.listdir(path) if f.endswith(".bin")]
        hint = " (found PyTorch .bin files: re-save with safetensors)" if bins else ""
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {SAFETENSORS_INDEX}{hint}")
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CheckpointError(f"{path}: safetensors shard(s) {missing} listed in the index are missing")
    return [os.path.join(path, f) for f in files]


class HFWeights(Mapping):
    """Read-on-demand view of a checkpoint's tensors (each rank reads only what it needs).

    Opening validates every file header, tensor presence and shape, so a corrupt or
    mismatched checkpoint fails before any model is built.
    """

    def __init__(self, path: str, spec: Qwen3Spec):
        self.path = path
        self._file_of: dict[str, str] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for file in _weight_files(path):
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        self._file_of[name] = file
                        shapes[name] = tuple(f.get_slice(name).get_shape())
            except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
                raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from exc
        if spec.tie_word_embeddings:
            self._file_of.pop("lm_head.weight", None)  # some exports store the tied copy too
        missing = [n for n in expected_hf_names(spec) if n not in self._file_of]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{more} for its config.json")
        for name, shape in expected_hf_shapes(spec).items():
            if shapes[name] != shape:
                raise CheckpointError(f"{path}: tensor {name} has shape {shapes[name]}, config.json implies {shape}")

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._file_of[name]
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({exc})") from exc

    def __iter__(self):
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def load_hf_weights(path: str, spec: Qwen3Spec) -> HFWeights:
    """The Qwen3 tensors of a checkpoint directory, validated, read on demand."""
    return HFWeights(path, spec)


def expected_hf_shapes(spec: Qwen3Spec) -> dict[str, tuple[int, ...]]:
    h, hd = spec.hidden_size, spec.head_dim
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (spec.num_attention_heads * hd, h),
            f"{p}.self_attn.k_proj.weight": (spec.num_key_value_heads * hd, h),
            f"{p}.self_attn.v_proj.weight": (spec.num_key_value_heads * hd, h),
            f"{p}.self_attn.o_proj.weight": (h, spec.num_attention_heads * hd),
            f"{p}.self_attn.q_norm.weight": (hd,),
            f"{p}.self_attn.k_norm.weight": (hd,),
            f"{p}.mlp.gate_proj.weight": (spec.intermediate_size, h),
            f"{p}.mlp.up_proj.weight": (spec.intermediate_size, h),
            f"{p}.mlp.down_proj.weight": (h, spec.intermediate_size),
        })
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def copy_aux_files(src: str, dst: str) -> list[str]:
    """Copy tokenizer/generation files that exist in ``src``; returns the names copied."""
    copied = []
    for name in AUX_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def save_hf_checkpoint(
    out_dir: str,
    hf_config: Mapping,
    tensors: Iterable[tuple[str, torch.Tensor]],
    aux_dir: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Write config.json + safetensors (sharded above ``max_shard_bytes``) into ``out_dir``.

    ``out_dir`` must exist (callers use fsutil.atomic_output_dir around this).
    """
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata=metadata)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata=metadata)
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(hf_config), f, indent=2, sort_keys=True)
    if aux_dir:
        copy_aux_files(aux_dir, out_dir)
