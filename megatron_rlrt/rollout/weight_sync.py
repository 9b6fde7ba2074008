"""Trainer -> rollout engine weights: Megatron shards -> HF-named full tensors -> buckets.

The names and layouts come from the one mapping (``models/mapping.py``) through
``iter_hf_tensors``; this module only moves tensors: all-gather across tensor parallelism
inside each pipeline stage, then point-to-point from each stage's owner to global rank 0,
where the in-process engine lives. Server engines (SGLang/vLLM) reuse ``iter_stage_hf_tensors``
and move buckets with their own transport.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_rlrt.models.megatron_checkpoint import iter_hf_tensors
from megatron_rlrt.models.qwen3 import Qwen3Spec
from megatron_rlrt.rollout.base import iter_weight_buckets


def gather_hf_weights_to_rank0(chunks: Sequence[torch.nn.Module], spec: Qwen3Spec
                               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor on CPU) on global rank 0, nothing elsewhere; collective.

    Every rank of data-parallel replica 0 takes part (TP gathers), other replicas return at once.
    """
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        return
    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    is_root = dist.get_rank() == 0
    for stage in range(pp_size):
        if stage == pp_rank:
            for name, tensor in iter_hf_tensors(chunks, spec):  # collective over this stage's TP group
                if tp_rank != 0:
                    continue
                if is_root:
                    yield name, tensor.detach().cpu()
                else:
                    dist.send_object_list([(name, tuple(tensor.shape), tensor.dtype)], dst=pp_ranks[0])
                    dist.send(tensor.detach().contiguous(), dst=pp_ranks[0])
            if tp_rank == 0 and not is_root:
                dist.send_object_list([None], dst=pp_ranks[0])
        elif is_root:
            src = pp_ranks[stage]
            while True:
                meta = [None]
                dist.recv_object_list(meta, src=src)
                if meta[0] is None:
                    break
                name, shape, dtype = meta[0]
                buf = torch.empty(shape, dtype=dtype, device=_device())
                dist.recv(buf, src=src)
                yield name, buf.cpu()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sync_weights(engine, chunks: Sequence[torch.nn.Module], spec: Qwen3Spec, version: int,
                 bucket_bytes: int = 512 * 1024**2) -> float:
    """Push the current policy into an in-process engine on rank 0; returns seconds taken.

    Collective (call on every rank); the engine only exists on rank 0.
    """
    start = time.perf_counter()
    stream = gather_hf_weights_to_rank0(chunks, spec)
    if dist.get_rank() == 0:
        engine.update_weights(iter_weight_buckets(stream, bucket_bytes), version)
    else:
        for _ in stream:
            pass
    return time.perf_counter() - start
