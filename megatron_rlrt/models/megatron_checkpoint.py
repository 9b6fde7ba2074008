"""Model checkpoints in megatron-core's distributed checkpoint format.

Layout of a checkpoint directory::

    metadata.json   what wrote it: Qwen3Spec, the TP/PP layout it was saved from, dtype
    hf/             config.json + tokenizer files of the source model (for export and rollout)
    model/          megatron-core dist_checkpointing (torch_dist) of the model chunks

dist_checkpointing stores every tensor with its global shape and offsets, so a checkpoint
written at one TP/PP layout loads at any other. Trainer checkpoints use the same layout and
add optimizer / trainer state beside ``model/``.

Trust: torch's distributed checkpoint (DCP) unpickles two things without limits: the
directory's ``.metadata`` (``pickle.load``) and each non-tensor object, e.g. megatron's
``common_state`` and ``_extra_state`` (``torch.load(weights_only=False)``). We close both:
:func:`check_dcp_metadata` first replays ``.metadata`` with an unpickler that admits only the
plain data classes torch writes there (tensor/chunk metadata, dtypes, sizes), and
:func:`weights_only_dcp_objects` makes DCP read the objects with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_rlrt.fsutil import atomic_output_dir
from megatron_rlrt.models import mapping as mp
from megatron_rlrt.models.hf_checkpoint import copy_aux_files
from megatron_rlrt.models.manifest import verify_manifest, write_manifest
from megatron_rlrt.models.qwen3 import CheckpointError, Qwen3Spec, read_checkpoint_json

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


# What torch.distributed.checkpoint writes into .metadata: dataclasses and enums of these modules,
# torch dtypes / Size / layouts, and nothing else.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem", "torch.distributed.checkpoint._extension",
                "torch.distributed.checkpoint.storage")
_DCP_EXACT = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
              ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "bytearray")}


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_EXACT:
            return super().find_class(module, name)
        if module == "torch":
            import torch as _t

            obj = getattr(_t, name, None)
            if isinstance(obj, (_t.dtype, _t.layout, _t.memory_format)):
                return obj
        elif module in _DCP_MODULES and "." not in name:
            import importlib

            import dataclasses
            import enum

            obj = getattr(importlib.import_module(module), name, None)
            # a dataclass or an enum defined in that module: never a function, never a class
            # whose constructor does I/O (FileSystemWriter, ...)
            if (isinstance(obj, type) and obj.__module__ == module
                    and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not something torch's checkpoint metadata holds")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in checkpoint metadata")


def _load_bytes_weights_only(self, read_item, value) -> None:
    """DefaultLoadPlanner.load_bytes with ``torch.load(weights_only=True)``."""
    from torch.distributed.checkpoint._traverse import set_element

    obj = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def weights_only_dcp_objects() -> None:
    """Make torch DCP (and megatron's planner, a subclass) unpickle non-tensor checkpoint objects
    with ``weights_only=True`` in this process (idempotent)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    DefaultLoadPlanner.load_bytes = _load_bytes_weights_only


def check_dcp_metadata(path: str) -> None:
    """Refuse a distributed-checkpoint directory whose pickled ``.metadata`` holds anything but
    the plain data torch writes there, before torch's reader unpickles it without limits.
    Also switches DCP's object loading to ``weights_only=True``."""
    weights_only_dcp_objects()
    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read the distributed-checkpoint metadata ({exc})") from None
    try:
        _DataOnlyUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001  (any failure: refuse, name the file)
        raise CheckpointError(f"{file}: refused to load ({type(exc).__name__}: {exc}); this checkpoint metadata "
                              "is damaged or was crafted to run code") from None


def load_dcp_dir(sharded_state: dict, path: str) -> dict:
    """dist_checkpointing.load, with any failure (a damaged file in a checkpoint without a
    manifest, another layout) turned into one CheckpointError line naming the directory."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    check_dcp_metadata(path)
    try:
        return dist_checkpointing.load(sharded_state, path)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001  (many types, 100-line messages)
        inner = exc
        if isinstance(exc, CheckpointException) and getattr(exc, "failures", None):  # {rank: wrapped error}
            failure = next(iter(exc.failures.values()))
            inner = getattr(failure, "exc", failure)
            inner = inner[0] if isinstance(inner, tuple) and inner else inner  # (exception, traceback)
        first = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
        raise CheckpointError(f"{path}: cannot load this distributed checkpoint ({type(inner).__name__}: "
                              f"{first[:300]})") from None


def read_model_dir(chunks: Sequence[torch.nn.Module], path: str) -> None:
    """Load ``path`` (written at any TP/PP layout) into this rank's model chunks (collective)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no megatron model checkpoint here")
    state = load_dcp_dir(sharded_model_state(chunks), path)
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
    meta = read_checkpoint_json(meta_path)
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
        write_manifest(tmp)


def copy_hf_config_dir(src: str, dst: str) -> None:
    import shutil

    shutil.copy2(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    copy_aux_files(src, dst)


def load_model_checkpoint(chunks: Sequence[torch.nn.Module], ckpt_dir: str) -> dict:
    """Load a checkpoint written by ``save_model_checkpoint`` or the trainer (any layout);
    returns metadata. Its manifest (if it has one) is checked first (collective)."""
    problem = verify_manifest(ckpt_dir)
    if problem:
        raise CheckpointError(problem)
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
