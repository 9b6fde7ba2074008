"""Vocab-parallel log-probs (and entropy) of target tokens, from logits or from hidden states.

Each tensor-parallel rank holds a vocabulary shard [rank * V/TP, (rank + 1) * V/TP). A rank
reduces its shard to four float statistics per row (max, sum-exp, target logit, entropy sum;
csrc/rlrt_ops.h), the ranks exchange them with ONE all-gather of a [N, 4] tensor, and every rank
combines the TP rows in rank order (so all ranks and repeats agree bit for bit). megatron-core's
``vocab_parallel_cross_entropy`` needs three all-reduces (max, target logit, sum-exp) for the same.

Backward needs no communication: the combined log Z and entropy per row are saved, and the
gradient into the shard is (onehot - softmax) / T * grad (+ the entropy term). The fused-linear
variant never materialises [N, V/TP] logits: it multiplies hidden states by vocabulary tiles of the
LM-head weight, folds each tile into running statistics (online softmax) and recomputes the tiles
in backward.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rlrt.ops import dispatch as _backend

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- statistics


def _tp_rank_size(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _gather_stats(stats: Tensor, tp_group, size: int) -> Tensor:
    """[P, N, 4]: every rank's statistics, in rank order. One collective."""
    if size == 1:
        return stats[None]
    stats = stats.contiguous()
    # the concatenated form [P * N, 4] works on gloo and NCCL alike
    out = torch.empty((size * stats.shape[0],) + tuple(stats.shape[1:]), dtype=stats.dtype, device=stats.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, stats, group=tp_group)
    return out.view((size,) + tuple(stats.shape))


def _merge(parts: Tensor, inv_t: float) -> Tensor:
    """Fold [P, N, 4] statistics (each relative to its own max) into [N, 4] relative to the max of
    all; computed in float64 in a fixed order."""
    p = parts.to(torch.float64)
    m, s, t, q = p.unbind(-1)
    big = m.amax(dim=0)
    shift = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    d = (m - shift) * inv_t  # <= 0; -inf for empty parts
    scale = torch.exp(d)
    live = s > 0
    s_all = (s * scale).sum(dim=0)
    q_all = torch.where(live, scale * (q + torch.where(live, d, torch.zeros_like(d)) * s), torch.zeros_like(q)).sum(dim=0)
    return torch.stack([big, s_all, t.sum(dim=0), q_all], dim=-1)


def _finish(stats: Tensor, inv_t: float, with_entropy: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(norm = [N, 2] of (max, log sum-exp), log p(target), entropy) in float32 from merged
    [N, 4] statistics. log Z = max + log sum-exp is kept in two parts for the backward kernels."""
    m, s, t, q = stats.to(torch.float64).unbind(-1)
    log_s = torch.log(s)
    norm = torch.stack([m, log_s], dim=-1)
    # log p = (t - m) / T - log s, t - m exact in float64; clamp the rounding of p <= 1 at 0
    logp = ((t - m) * inv_t - log_s).clamp(max=0.0)
    entropy = (log_s - q / s).clamp(min=0.0).to(torch.float32) if with_entropy else None
    return norm.to(torch.float32), logp.to(torch.float32), entropy


def _local_targets(targets: Tensor, start: int, size: int) -> Tensor:
    local = targets - start
    return torch.where((local >= 0) & (local < size), local, torch.full_like(local, -1))


def _check(targets: Tensor, vocab: int, temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 token ids, got {targets.dtype}")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"targets must be global vocabulary ids in [0, {vocab}); got min {lo}, max {hi}")


# ----------------------------------------------------------------------------- from logits


class _FromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, tp_group, with_entropy, inplace_backward):
        rank, size = _tp_rank_size(tp_group)
        shard = logits.shape[1]
        kernels = _backend.kernels_for(logits)
        local = _local_targets(targets, rank * shard, shard)
        inv_t = 1.0 / temperature
        stats = kernels.stats(logits, local, inv_t, with_entropy)
        norm, logp, entropy = _finish(_merge(_gather_stats(stats, tp_group, size), inv_t), inv_t, with_entropy)
        ctx.inv_t, ctx.with_entropy, ctx.inplace = inv_t, with_entropy, inplace_backward
        ctx.save_for_backward(logits, local, norm, entropy if with_entropy else None)
        ctx.set_materialize_grads(False)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        logits, local, norm, entropy = ctx.saved_tensors
        nones = (None,) * 5
        if not ctx.needs_input_grad[0] or (g_lp is None and g_ent is None):
            return (None,) + nones
        if g_lp is None:
            g_lp = torch.zeros_like(norm[:, 0])
        if ctx.inplace:
            out = logits  # megatron-style buffer reuse: the gradient overwrites the logits
        else:
            out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        _backend.kernels_for(logits).grad(
            logits, local, norm, g_lp.contiguous(), None if g_ent is None else g_ent.contiguous(),
            entropy if g_ent is not None else None, ctx.inv_t, out,
        )
        if ctx.inplace:  # a later backward that saved these logits must fail loudly, not read gradients
            torch.autograd.graph.increment_version(logits)
        return (out,) + nones


def vocab_parallel_logprobs(
    logits_shard: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    tp_group=None,
    with_entropy: bool = False,
    inplace_backward: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """log p(target) over the FULL vocabulary from this rank's logits shard, and the entropy.

    logits_shard: [..., V/TP] (float32, bfloat16 or float16; float64 runs the reference), this
        rank's slice [rank * V/TP, (rank + 1) * V/TP) of the vocabulary (megatron's layout).
    targets: [...] GLOBAL token ids in [0, V).
    temperature: logits are divided by it (sampling temperature).
    tp_group: the tensor-parallel process group; None = the shard is the whole vocabulary.
    inplace_backward: write the gradient into the logits' own storage (as megatron-core does)
        instead of a new [N, V/TP] buffer. Only for logits that nothing reads after this backward
        (the LM head's output); refused for leaf tensors.
    Returns (log-probs [...] float32, <= 0; entropy [...] float32 or None). Differentiable with
    respect to ``logits_shard``: grad = (onehot - softmax) / T * grad_logp (+ the entropy term).
    """
    if logits_shard.dim() < 1 or tuple(targets.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(f"targets {tuple(targets.shape)} must match the logits' leading dims "
                         f"{tuple(logits_shard.shape[:-1])}")
    _, size = _tp_rank_size(tp_group)
    _check(targets, logits_shard.shape[-1] * size, temperature)
    if inplace_backward and logits_shard.requires_grad and logits_shard.is_leaf:
        raise ValueError("inplace_backward would make a leaf tensor its own gradient; use it on the LM head's output")
    lead = targets.shape
    logits2d = logits_shard.reshape(-1, logits_shard.shape[-1])
    if logits2d.shape[1] > 1 and logits2d.stride(1) != 1:
        logits2d = logits2d.contiguous()
    out = _FromLogits.apply(logits2d, targets.reshape(-1).long(), float(temperature), tp_group, with_entropy,
                            bool(inplace_backward))
    if with_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead), None


# ----------------------------------------------------------------------------- fused linear


def _tiles(vocab: int, chunk: int):
    for c0 in range(0, vocab, chunk):
        yield c0, min(vocab, c0 + chunk)


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, tp_group, with_entropy, chunk_size, reduce_hidden_grad):
        rank, size = _tp_rank_size(tp_group)
        shard = weight.shape[0]
        local = _local_targets(targets, rank * shard, shard)
        inv_t = 1.0 / temperature
        running = None
        for c0, c1 in _tiles(shard, chunk_size):
            tile = torch.matmul(hidden, weight[c0:c1].t())  # [N, C] in the input dtype
            kernels = _backend.kernels_for(tile)
            st = kernels.stats(tile, _local_targets(local, c0, c1 - c0), inv_t, with_entropy)
            del tile
            # online softmax across tiles: fold the tile's statistics into the running ones (float64)
            running = st if running is None else _merge(torch.stack([running.to(torch.float64), st.to(torch.float64)]), inv_t)
        if running is None:  # empty shard
            running = torch.tensor([float("-inf"), 0.0, 0.0, 0.0], device=hidden.device).expand(hidden.shape[0], 4)
        norm, logp, entropy = _finish(_merge(_gather_stats(running.float(), tp_group, size), inv_t), inv_t, with_entropy)
        ctx.inv_t, ctx.chunk, ctx.tp_group, ctx.size = inv_t, chunk_size, tp_group, size
        ctx.reduce_hidden_grad = reduce_hidden_grad
        ctx.save_for_backward(hidden, weight, local, norm, entropy if with_entropy else None)
        ctx.set_materialize_grads(False)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, local, norm, entropy = ctx.saved_tensors
        nones = (None,) * 6
        if g_lp is None and g_ent is None:
            return (None, None) + nones
        if g_lp is None:
            g_lp = torch.zeros_like(norm[:, 0])
        g_lp = g_lp.contiguous()
        g_ent = None if g_ent is None else g_ent.contiguous()
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if want_w else None
        for c0, c1 in _tiles(weight.shape[0], ctx.chunk):
            w = weight[c0:c1]
            tile = torch.matmul(hidden, w.t())
            _backend.kernels_for(tile).grad(
                tile, _local_targets(local, c0, c1 - c0), norm, g_lp, g_ent,
                entropy if g_ent is not None else None, ctx.inv_t, tile,  # in place: the tile is ours
            )
            if want_h:
                if tile.dtype == torch.float32:
                    grad_h.addmm_(tile, w)
                else:
                    grad_h += torch.matmul(tile, w).float()
            if want_w:
                torch.matmul(tile.t(), hidden, out=grad_w[c0:c1])
            del tile
        if want_h and ctx.size > 1 and ctx.reduce_hidden_grad:
            # hidden is replicated over TP (input of a column-parallel LM head): its gradient is the
            # sum of every shard's contribution, as megatron's ColumnParallelLinear backward does.
            dist.all_reduce(grad_h, group=ctx.tp_group)
        return (grad_h.to(hidden.dtype) if want_h else None, grad_w) + nones


def fused_linear_logprobs(
    hidden: Tensor,
    weight_shard: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    tp_group=None,
    with_entropy: bool = False,
    chunk_size: int = 4096,
    reduce_hidden_grad: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """``vocab_parallel_logprobs(hidden @ weight_shard.T, ...)`` without the [N, V/TP] logits.

    hidden: [..., H], the LM head's input (replicated over TP, as megatron's output layer sees it);
    weight_shard: [V/TP, H], this rank's rows of the LM-head weight. Logit tiles [N, chunk_size]
    are computed in the input dtype (like the unfused output layer), reduced to running
    statistics and dropped; backward recomputes them. Gradients: hidden and weight_shard. The
    hidden gradient is all-reduced over the TP group inside (what megatron's
    copy_to_tensor_model_parallel_region does for the output layer), so do NOT also wrap
    ``hidden`` in it; pass ``reduce_hidden_grad=False`` when the caller reduces it itself (e.g.
    hidden all-gathered with gather_from_sequence_parallel_region under sequence parallelism,
    whose backward reduce-scatters). Returns (log-probs [...] float32, entropy or None).
    """
    if hidden.dim() < 1 or tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets {tuple(targets.shape)} must match the hidden states' leading dims "
                         f"{tuple(hidden.shape[:-1])}")
    if weight_shard.dim() != 2 or weight_shard.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight_shard must be [V/TP, {hidden.shape[-1]}], got {tuple(weight_shard.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _, size = _tp_rank_size(tp_group)
    _check(targets, weight_shard.shape[0] * size, temperature)
    lead = targets.shape
    out = _FusedLinear.apply(hidden.reshape(-1, hidden.shape[-1]), weight_shard, targets.reshape(-1).long(),
                             float(temperature), tp_group, with_entropy, int(chunk_size), bool(reduce_hidden_grad))
    if with_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead), None
