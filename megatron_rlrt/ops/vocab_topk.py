"""Top-K distillation over a tensor-parallel vocabulary: logits of this rank's vocab shard,
the full-vocabulary log-sum-exp, the global top-K ids, and the logits at given global ids.

Each rank holds logits [n, V/TP] of its vocab shard (as megatron's vocab-parallel output
layer); the collectives run over the tensor-parallel group and the gradients flow like
megatron's ``ColumnParallelLinear`` / ``vocab_parallel_cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def shard_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float,
                 sequence_parallel: bool = False) -> torch.Tensor:
    """[n, V/TP] float32 logits of this rank's vocab shard for replicated hidden states [n, H]."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    if not sequence_parallel:
        # identity forward, all-reduce of the input gradient backward (what ColumnParallelLinear
        # does); under sequence parallelism the caller's all-gather reduce-scatters it instead
        hidden = copy_to_tensor_model_parallel_region(hidden)
    return (hidden @ weight.t()).float() / temperature


def vocab_parallel_lse(logits: torch.Tensor, group, tp_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-sum-exp over the full vocabulary [n], exp(logits - max) [n, V/TP], its full-vocab sum [n])."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    gmax = logits.detach().max(dim=-1).values
    if tp_size > 1:
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    exp = torch.exp(logits - gmax[:, None])
    sumexp = exp.sum(-1)
    if tp_size > 1:  # all-reduce forward, identity backward: each rank's share of the gradient
        sumexp = reduce_from_tensor_model_parallel_region(sumexp)
    return gmax + sumexp.log(), exp, sumexp


def gather_at_global_ids(logits: torch.Tensor, ids: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """logits at global vocab ids [n, k] (differentiable), summed over the rank owning each id."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    shard = logits.shape[-1]
    local = ids - tp_rank * shard
    inside = (local >= 0) & (local < shard)
    values = logits.gather(1, local.clamp(0, shard - 1)) * inside
    return reduce_from_tensor_model_parallel_region(values) if tp_size > 1 else values


def global_topk_ids(logits: torch.Tensor, k: int, tp_size: int, tp_rank: int, group) -> torch.Tensor:
    """Global vocab ids [n, k] of the k largest logits over all vocab shards."""
    k_local = min(k, logits.shape[-1])
    values, local_ids = logits.topk(k_local, dim=-1)
    ids = local_ids + tp_rank * logits.shape[-1]
    if tp_size == 1:
        return ids
    all_values = [torch.empty_like(values) for _ in range(tp_size)]
    all_ids = [torch.empty_like(ids) for _ in range(tp_size)]
    dist.all_gather(all_values, values.contiguous(), group=group)
    dist.all_gather(all_ids, ids.contiguous(), group=group)
    values, ids = torch.cat(all_values, -1), torch.cat(all_ids, -1)
    best = values.topk(k, dim=-1).indices
    return ids.gather(1, best)
