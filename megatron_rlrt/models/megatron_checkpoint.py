"""Model checkpoints in megatron-core's distributed checkpoint format.

Layout of a checkpoint directory::

    metadata.json   what wrote it: Qwen3Spec, the TP/PP layout it was saved from, dtype
    hf/             config.json + tokenizer files of the source model (for export and rollout)
    model/          megatron-core dist_checkpointing (torch_dist) of the model chunks

dist_checkpointing stores every tensor with its global shape and offsets, so a checkpoint
written at one TP/PP layout loads at any other. Trainer checkpoints use the same layout and
add optimizer / trainer state beside ``model/``.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_rlrt.fsutil import atomic_output_dir
from megatron_rlrt.models import mapping as mp
from megatron_rlrt.models.hf_checkpoint import copy_aux_files
from megatron_rlrt.models.qwen3 import CheckpointError, Qwen3Spec

FORMAT = "megatron-rlrt"
FORMAT_VERSION = 1
METADATA = "metadata.json"
MODEL_DIR = "model"
HF_DIR = "hf"


def sharded_model_state(chunks: Sequence[torch.nn.Module]) -> dict:
    """One sharded state dict for all of this rank's model chunks."""
    if len(chunks) == 1:
        return {"model": mp.unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": mp.unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def write_model_dir(chunks: Sequence[torch.nn.Module], path: str) -> None:
    """dist_checkpointing.save of the model chunks into ``path`` (collective)."""
    from megatron.core import dist_checkpointing

    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(sharded_model_state(chunks), path)


def read_model_dir(chunks: Sequence[torch.nn.Module], path: str) -> None:
    """Load ``path`` (written at any TP/PP layout) into this rank's model chunks (collective)."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no megatron model checkpoint here")
    state = dist_checkpointing.load(sharded_model_state(chunks), path)
    if len(chunks) == 1:
        mp.unwrap(chunks[0]).load_state_dict(state["model"], strict=True)
    else:
        for i, c in enumerate(chunks):
            mp.unwrap(c).load_state_dict(state[f"model{i}"], strict=True)


def write_metadata(path: str, spec: Qwen3Spec, **extra) -> None:
    from megatron.core import parallel_state as ps

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "saved_tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "saved_pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        **extra,
    }
    with open(os.path.join(path, METADATA), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def read_metadata(path: str) -> dict:
    meta_path = os.path.join(path, METADATA)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path}: missing; {path} is not a megatron-rlrt checkpoint")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format {meta.get('format')!r} v{meta.get('format_version')}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}"
        )
    return meta


def spec_of_checkpoint(path: str) -> Qwen3Spec:
    return Qwen3Spec(**read_metadata(path)["spec"])


def save_model_checkpoint(
    chunks: Sequence[torch.nn.Module], spec: Qwen3Spec, out_dir: str, hf_dir: str,
    overwrite: bool = False, **metadata,
) -> None:
    """Write a complete model checkpoint atomically (collective over all ranks)."""
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_model_dir(chunks, os.path.join(tmp, MODEL_DIR))
        if not dist.is_initialized() or dist.get_rank() == 0:
            os.makedirs(os.path.join(tmp, HF_DIR))
            copy_hf_config_dir(hf_dir, os.path.join(tmp, HF_DIR))
            write_metadata(tmp, spec, **metadata)


def copy_hf_config_dir(src: str, dst: str) -> None:
    import shutil

    shutil.copy2(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    copy_aux_files(src, dst)


def load_model_checkpoint(chunks: Sequence[torch.nn.Module], ckpt_dir: str) -> dict:
    """Load a checkpoint written by ``save_model_checkpoint`` (any layout); returns metadata."""
    meta = read_metadata(ckpt_dir)
    read_model_dir(chunks, os.path.join(ckpt_dir, MODEL_DIR))
    return meta


# --- HF tensors <-> a rank's model chunks ----------------------------------------------------


def load_hf_into_model(chunks: Sequence[torch.nn.Module], spec: Qwen3Spec, hf: dict[str, torch.Tensor]) -> None:
    """Copy full Hugging Face tensors into this rank's TP/PP shards of the model."""
    from megatron.core import parallel_state as ps

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for m, param in mp.named_model_params(chunks, spec):
            full = mp.hf_to_megatron(m, [hf[n] for n in m.hf_names], spec)
            shard = mp.tp_shard(m, full, tp_rank, tp_size)
            if shard.shape != param.shape:
                raise CheckpointError(
                    f"{m.megatron_name}: converted shard {tuple(shard.shape)} != parameter {tuple(param.shape)}"
                )
            param.copy_(shard)
        # With tied embeddings and PP>1 the last stage holds its own copy of the embedding as
        # the output layer; megatron keeps the two equal through the embedding group.
        if spec.tie_word_embeddings:
            for chunk in chunks:
                chunk = mp.unwrap(chunk)
                if chunk.post_process and not chunk.pre_process and getattr(chunk, "output_layer", None) is not None:
                    m = mp.mapping_by_name(spec)["embedding.word_embeddings.weight"]
                    chunk.output_layer.weight.copy_(mp.tp_shard(m, hf["model.embed_tokens.weight"], tp_rank, tp_size))


def gather_tp(mapping: mp.ParamMapping, local: torch.Tensor) -> torch.Tensor:
    """Full Megatron tensor from the tensor-parallel shards (collective over the TP group)."""
    from megatron.core import parallel_state as ps

    tp_size = ps.get_tensor_model_parallel_world_size()
    if mapping.tp_dim is None or tp_size == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return mp.tp_merge(mapping, shards)


def iter_hf_tensors(chunks: Sequence[torch.nn.Module], spec: Qwen3Spec) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, full tensor) for the parameters of this pipeline stage.

    Collective over the tensor-parallel group (every TP rank must iterate). Each pipeline
    stage yields only its own layers; callers move them across stages as they need.
    """
    for m, param in mp.named_model_params(chunks, spec):
        full = gather_tp(m, param.detach())
        yield from zip(m.hf_names, mp.megatron_to_hf(m, full, spec))
