"""Mask-free causal attention over packed (THD) rows, with context parallelism, in pure torch.

The core attention of the local (CPU) layer spec. megatron-core's own ``DotProductAttention``
builds [b, heads, s, s] scores from an explicit mask, refuses packed sequences and asserts
``context_parallel_size == 1``; on a GPU Transformer Engine's attention does all three (THD,
``cp_comm_type="p2p"``). This module gives the CPU the same contract:

* input: query [t, heads, d], key/value [t, groups, d] of THIS context-parallel rank's tokens of a
  packed batch, ``packed_seq_params.cu_seqlens_q`` holding the FULL (un-split) row boundaries,
  each row's length a multiple of 2 x CP (the zigzag split: CP rank i holds chunks i and
  2*CP-1-i of every row, megatron's ``get_batch_on_this_cp_rank`` layout);
* K/V are all-gathered over the CP group (the Llama 3 / TE ``all_gather`` scheme; backward
  all-reduces their gradient and keeps this rank's part) and put back into row order;
* each local query chunk attends causally to the keys of its own row with
  ``torch.nn.functional.scaled_dot_product_attention`` in query blocks of ``BLOCK`` rows: a
  block's boolean mask is [BLOCK, keys so far], never [T, T]. Under autograd each block is
  checkpointed (its mask and softmax are rebuilt in backward), so the memory held for backward
  is q, k, v and the output: linear in the packed length.

Unpacked [s, b, heads, d] input (``packed_seq_params`` None) is treated as b causal rows
(the full sequence; with CP each row is zigzag-split like a packed row).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_rlrt.packing import zigzag_chunks

BLOCK = 512  # query rows per SDPA call: bounds the per-call mask/scores to BLOCK x row length


class _GatherCP(torch.autograd.Function):
    """All-gather along dim 0 over the CP group; backward sums the gradient over the group and
    returns this rank's slice (every rank's queries attended to every gathered key)."""

    @staticmethod
    def forward(ctx, x, group):
        size = dist.get_world_size(group=group)
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group=group), x.shape[0]
        x = x.contiguous()
        out = torch.empty((size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def gathered_to_row_order(lengths: list[int], cp_size: int, device=None) -> torch.Tensor:
    """Index into the CP all-gather of local tokens ([cp * t_local]) that yields the full packed
    sequence in order (every row whole)."""
    t_local = sum(lengths) // cp_size
    order = torch.empty(sum(lengths), dtype=torch.long)
    start = 0
    for length in lengths:
        local_start = start // cp_size
        for rank in range(cp_size):
            offset = 0
            for row_start, size in zigzag_chunks(length, cp_size, rank):
                src = rank * t_local + local_start + offset
                order[start + row_start : start + row_start + size] = torch.arange(src, src + size)
                offset += size
        start += length
    return order.to(device)


def _block_attention(q, k, v, first_pos, scale, dropout_p):
    """q [h, n, d] at row positions first_pos..first_pos+n-1; k/v [h, first_pos+n, d]; causal."""
    n, s = q.shape[1], k.shape[1]
    visible = torch.arange(s, device=q.device)[None, :] <= (first_pos + torch.arange(n, device=q.device))[:, None]
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=visible, dropout_p=dropout_p,
                                         scale=scale)
    return out[0]


def packed_causal_attention(query, key, value, lengths: list[int], *, scale: float, cp_group=None,
                            dropout_p: float = 0.0, block: int = BLOCK):
    """Causal attention within each packed row. query [t, hq, d], key/value [t, hk, d] hold this
    CP rank's zigzag part of rows of the given FULL ``lengths``; returns [t, hq, d]."""
    cp_size = 1 if cp_group is None else dist.get_world_size(group=cp_group)
    cp_rank = 0 if cp_group is None else dist.get_rank(group=cp_group)
    if sum(lengths) != query.shape[0] * cp_size:
        raise ValueError(f"packed rows of {sum(lengths)} tokens in all, but {query.shape[0]} local tokens x "
                         f"context-parallel size {cp_size}")
    hq, hk = query.shape[1], key.shape[1]
    if hq % hk:
        raise ValueError(f"{hq} query heads are not a multiple of {hk} key/value groups")
    if cp_size > 1:
        order = gathered_to_row_order(lengths, cp_size, key.device)
        key = _GatherCP.apply(key, cp_group)[order]
        value = _GatherCP.apply(value, cp_group)[order]
    use_checkpoint = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    outs = []
    row_start, local = 0, 0
    for length in lengths:
        # [h, L, d]; GQA: each key/value group serves hq / hk consecutive query heads (megatron's layout)
        k_row = key[row_start : row_start + length].transpose(0, 1).repeat_interleave(hq // hk, dim=0)
        v_row = value[row_start : row_start + length].transpose(0, 1).repeat_interleave(hq // hk, dim=0)
        for chunk_start, size in zigzag_chunks(length, cp_size, cp_rank):
            q_chunk = query[local : local + size].transpose(0, 1)
            for a in range(0, size, block):
                b = min(size, a + block)
                first, end = chunk_start + a, chunk_start + b
                args = (q_chunk[:, a:b], k_row[:, :end], v_row[:, :end], first, scale, dropout_p)
                if use_checkpoint:
                    out = checkpoint(_block_attention, *args, use_reentrant=False)
                else:
                    out = _block_attention(*args)
                outs.append(out)
            local += size
        row_start += length
    return torch.cat(outs, dim=1).transpose(0, 1)


from megatron_rlrt.platform import setup_megatron  # noqa: E402  (megatron importable on this platform first)

setup_megatron()
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.utils import divide  # noqa: E402


class PackedCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` for megatron's local layer spec (same constructor and forward
    signature as ``DotProductAttention`` / ``TEDotProductAttention``); see the module docstring."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        tp = pg_collection.tp.size()
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups, tp)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling is not supported by PackedCoreAttention")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("sliding-window attention is not supported by PackedCoreAttention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r} is not supported by PackedCoreAttention")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        cp = getattr(pg_collection, "cp", None)
        self.cp_group = cp if cp is not None and cp.size() > 1 else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by PackedCoreAttention")
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"PackedCoreAttention takes qkv_format 'thd', got {packed_seq_params.qkv_format!r}")
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            lengths = (cu[1:] - cu[:-1]).tolist()
            out = packed_causal_attention(query, key, value, lengths, scale=self.softmax_scale,
                                          cp_group=self.cp_group, dropout_p=dropout)
            return out.reshape(out.shape[0], -1)  # [t, heads * d]; megatron adds the batch dim
        # [s, b, h, d]: b independent causal rows (with CP, each row zigzag-split)
        s, b = query.shape[:2]
        cp = 1 if self.cp_group is None else self.cp_group.size()
        if attention_mask is not None:
            full = attention_mask.shape[-1]
            causal = torch.ones(full, full, dtype=torch.bool, device=attention_mask.device).triu(1)
            if full != s * cp or not torch.equal(attention_mask.reshape(-1, full, full)[0], causal):
                raise ValueError("PackedCoreAttention applies causal masking itself; got an attention_mask that "
                                 "is not the plain causal mask (use packed_seq_params for packed rows)")
        outs = [packed_causal_attention(query[:, i], key[:, i], value[:, i], [s * cp], scale=self.softmax_scale,
                                        cp_group=self.cp_group, dropout_p=dropout) for i in range(b)]
        return torch.stack(outs, dim=1).reshape(s, b, -1)
