"""Trainer -> rollout engine weights: Megatron shards -> HF-named full tensors -> buckets.

The names and layouts come from the one mapping (``models/mapping.py``) through
``iter_hf_tensors``; this module only moves tensors inside the training job: all-gather across
tensor parallelism inside each pipeline stage, then point-to-point from each stage's owner to
the ranks that talk to the rollout servers (global rank 0, or every node's local rank 0 when
colocated: ``rollout/fleet.py``), on the device their transport needs
(``rollout/weight_transport.py``).
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_rlrt.models.megatron_checkpoint import iter_hf_tensors
from megatron_rlrt.models.qwen3 import Qwen3Spec
from megatron_rlrt.platform import current_device
from megatron_rlrt.rollout.base import iter_weight_buckets


def gather_hf_weights(chunks: Sequence[torch.nn.Module], spec: Qwen3Spec, receivers: Sequence[int] = (0,),
                      device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every (hf_name, full tensor on ``device``) on each rank of ``receivers``, nothing
    elsewhere; collective (call on every rank).

    A receiver gets the weights from its own model replica (same data/context-parallel index), so
    in a colocated multi-node job each node's receiver reads the ranks of its node where the
    layout allows: its own pipeline stage from its TP all-gather, the other stages point-to-point
    from their TP-rank-0 owners. Replicas without a receiver return at once.
    """
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_rank(with_context_parallel=True)
    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    layout: list = [None] * dist.get_world_size()
    dist.all_gather_object(layout, (dp, pp_rank, tp_rank))
    me, device = dist.get_rank(), torch.device(device)
    mine = [r for r in receivers if layout[r][0] == dp]  # receivers this replica serves
    if not mine:
        return
    is_receiver = me in receivers
    owners = {s: next(r for r, (d, p, t) in enumerate(layout) if d == dp and p == s and t == 0) for s in range(pp_size)}
    for stage in range(pp_size):
        if stage == pp_rank:
            elsewhere = [r for r in mine if layout[r][1] != stage] if tp_rank == 0 else []
            for name, tensor in iter_hf_tensors(chunks, spec):  # collective over this stage's TP group
                # send before yielding: the consumer may block in a collective with the receivers
                # (the tensor transport's per-bucket handle exchange) that they can only join once
                # they hold this tensor
                for dst in elsewhere:
                    dist.send_object_list([(name, tuple(tensor.shape), tensor.dtype)], dst=dst)
                    dist.send(tensor.detach().contiguous(), dst=dst)
                if is_receiver:
                    yield name, tensor.detach().to(device)
            for dst in elsewhere:
                dist.send_object_list([None], dst=dst)
        elif is_receiver:
            src = owners[stage]
            while True:
                meta = [None]
                dist.recv_object_list(meta, src=src)
                if meta[0] is None:
                    break
                name, shape, dtype = meta[0]
                buf = torch.empty(shape, dtype=dtype, device=current_device())
                dist.recv(buf, src=src)
                yield name, buf.to(device)


def gather_hf_weights_to_rank0(chunks: Sequence[torch.nn.Module], spec: Qwen3Spec
                               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor on CPU) on global rank 0, nothing elsewhere; collective."""
    return gather_hf_weights(chunks, spec, (0,), "cpu")


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
