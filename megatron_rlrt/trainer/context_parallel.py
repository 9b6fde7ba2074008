"""Context parallelism of the trainer's passes (``--context-parallel-size``).

Context parallelism (``--context-parallel-size``): every row is padded at its end to a multiple of
2 x CP (x TP under sequence parallelism), each CP rank feeds the model its zigzag share of the
packed sequence (chunks i and 2*CP-1-i of every row) with ``cu_seqlens`` of the full lengths, so
RoPE sees each token's real position (megatron's THD rotary) and attention all rows whole (TE p2p
on a GPU, PackedCoreAttention on a CPU). The LM head and the log-prob op run on local tokens
(TP reductions inside the op); then only the per-token columns cross CP: they are all-gathered
back into sequence order, other ranks' values detached, this rank's with their gradient. Every CP
rank therefore sees the whole per-token picture -- the student and teacher log-probs of a response
token are paired even when its student and teacher rows sit in different chunks -- and computes
the same loss; only its own tokens carry gradient, megatron's DDP sums gradients over DP x CP,
and the token count is reported by CP rank 0 alone, so the divisor is the global count once
(NeMo-RL / verl's design rather than slime's local loss: advantages, RLRT weights and metrics
read whole rows, and nothing downstream needs to know about CP). Top-K distillation works the
same way: the top-K ids and log-probs are columns like the others; in the shared student+teacher
pass a teacher position reads its ids from the gathered columns of its student position (often on
the other CP rank), then its columns are gathered again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_rlrt.packing import PackedBatch, zigzag_index


@dataclass
class CpSplit:
    """This CP rank's part of a micro-batch (``request.positions`` index its local sequence)."""

    local_index: torch.Tensor  # packed positions fed to the model on this rank, in local order
    slots: torch.Tensor  # output column of each local request row
    counts: list[int]  # request rows per CP rank
    order: torch.Tensor  # output column of each row of the CP all-gather (ranks concatenated)


def cp_size_rank() -> tuple[int, int]:
    """(context-parallel size, rank); (1, 0) before megatron's groups exist."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 0
    return ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()


def split_for_cp(packed: PackedBatch, positions: torch.Tensor, cp_size: int, cp_rank: int
                 ) -> tuple[torch.Tensor, CpSplit]:
    """The label ``positions`` (all of the micro-batch, sorted) this rank holds in its zigzag share,
    as indices into its local sequence, and the map that gathers every rank's columns back."""
    column = torch.full((packed.num_tokens,), -1, dtype=torch.long)
    column[positions] = torch.arange(len(positions))
    per_rank = []
    for r in range(cp_size):
        local = zigzag_index(packed.cu_seqlens, cp_size, r)
        cols = column[local]
        per_rank.append((local, (cols >= 0).nonzero()[:, 0], cols[cols >= 0]))
    local_index, request_positions, slots = per_rank[cp_rank]
    return request_positions, CpSplit(local_index, slots, [len(p[2]) for p in per_rank],
                                      torch.cat([p[2] for p in per_rank]))


def gather_columns_over_cp(cols: torch.Tensor, split: CpSplit) -> torch.Tensor:
    """[all label positions, C] in sequence order from every CP rank's local columns: one
    all-gather of per-token values (padded to the largest share); other ranks' rows are
    detached, this rank's keep their gradient."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_context_parallel_group()
    width = max(split.counts)
    mine = cols.new_zeros((width, cols.shape[1]))
    mine[: cols.shape[0]] = cols.detach()
    parts = [torch.empty_like(mine) for _ in split.counts]
    dist.all_gather(parts, mine, group=group)
    gathered = torch.cat([p[:n] for p, n in zip(parts, split.counts)])
    full = cols.new_empty((len(split.order), cols.shape[1]))
    full[split.order.to(cols.device)] = gathered
    return full.index_put((split.slots.to(cols.device),), cols)  # out of place: grads of local rows


def report_on_cp_rank0(loss_fn: Callable, cp_rank: int) -> Callable:
    """Every CP rank computes the same loss over the whole rows (its own tokens carry the
    gradient); only CP rank 0 reports the token count and metrics, so megatron's divisor (summed
    over DP x CP) and the logged means count each token once."""
    if cp_rank == 0:
        return loss_fn

    def silent(mb, cols):
        loss, count, _ = loss_fn(mb, cols)
        return loss, torch.zeros_like(count), {}

    return silent
