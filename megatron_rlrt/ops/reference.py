"""Pure-torch kernels with the same contract as the csrc/ extension: the fallback and the oracle.

Each function processes a block of rows at a time, so the float32 temporaries stay near
``CHUNK_BYTES`` whatever N is; no [N, V] float32 copy of the logits is made. float64 logits
are computed in float64. See csrc/rlrt_ops.h for the statistics' definition.
"""

from __future__ import annotations

from typing import Optional

import torch

NUM_STATS = 4
# exp(LOW) is 0 in float32: clamping log p (or x' - m) there changes no finite result and makes
# -inf logits contribute 0 instead of 0 * -inf = NaN.
LOW = -200.0
CHUNK_BYTES = 32 * 2**20


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows_per_chunk(num_cols: int, bytes_per: int = 4) -> int:
    return max(1, CHUNK_BYTES // max(1, num_cols * bytes_per))


def _target_logits(x: torch.Tensor, local_targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x[target] (raw) for rows whose target is in this shard, 0 elsewhere."""
    num_cols = x.shape[1]
    local = (local_targets >= 0) & (local_targets < num_cols)
    if num_cols == 0:
        return torch.zeros(x.shape[0], dtype=dtype, device=x.device)
    picked = x.gather(1, local_targets.clamp(0, num_cols - 1)[:, None])[:, 0].to(dtype)
    return torch.where(local, picked, torch.zeros_like(picked))


def stats(logits: torch.Tensor, local_targets: torch.Tensor, inv_temp: float, with_entropy: bool) -> torch.Tensor:
    """[N, 4] = (max x, sum exp(d), x[target] or 0, sum exp(d) d) with d = (x - max x) * inv_temp."""
    n, num_cols = logits.shape
    dtype = _compute_dtype(logits)
    out = torch.zeros(n, NUM_STATS, dtype=dtype, device=logits.device)
    step = _rows_per_chunk(num_cols, 8 if dtype == torch.float64 else 4)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        x = logits[r0:r1].to(dtype, copy=True)
        m = x.amax(dim=1) if num_cols else torch.full((r1 - r0,), float("-inf"), dtype=dtype, device=x.device)
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf rows: keep exp(-inf) = 0
        x.sub_(shift[:, None])
        if inv_temp != 1.0:
            x.mul_(inv_temp)
        out[r0:r1, 2] = _target_logits(logits[r0:r1], local_targets[r0:r1], dtype)
        if with_entropy:
            e = torch.exp(x)
            out[r0:r1, 3] = (e * x.clamp_min_(LOW)).sum(dim=1)
            out[r0:r1, 1] = e.sum(dim=1)
        else:
            out[r0:r1, 1] = x.exp_().sum(dim=1)
        out[r0:r1, 0] = m
    return out


def grad(
    logits: torch.Tensor,
    local_targets: torch.Tensor,
    norm: torch.Tensor,
    g_lp: torch.Tensor,
    g_ent: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    inv_temp: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """out = d(g_lp . log p(target) + g_ent . H) / d logits, written in out's dtype.

    With l = (x - M) / T - log S = log p (norm = [N, 2] of (M, log S)):
    g = a (onehot - p) - c p (l + H),  a = g_lp / T, c = g_ent / T.
    """
    n, num_cols = logits.shape
    dtype = _compute_dtype(logits)
    step = _rows_per_chunk(num_cols, 8 if dtype == torch.float64 else 4)
    local = (local_targets >= 0) & (local_targets < num_cols)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        a = (g_lp[r0:r1].to(dtype) * inv_temp)[:, None]
        l = logits[r0:r1].to(dtype, copy=True)
        nm = norm[r0:r1].to(dtype)
        l.sub_(nm[:, :1])
        if inv_temp != 1.0:
            l.mul_(inv_temp)
        l.sub_(nm[:, 1:])
        if g_ent is not None:
            c = (g_ent[r0:r1].to(dtype) * inv_temp)[:, None]
            k0 = a + c * entropy[r0:r1].to(dtype)[:, None]
            l.clamp_min_(LOW)
            g = torch.exp(l).mul_(k0 + c * l).neg_()
        else:
            g = l.exp_().mul_(-a)
        rows = torch.nonzero(local[r0:r1])[:, 0]
        if rows.numel():
            cols = local_targets[r0:r1][rows]
            g[rows, cols] += a[rows, 0]
        out[r0:r1].copy_(g)
    return out


def epilogue(
    student: torch.Tensor,
    teacher: torch.Tensor,
    adv: torch.Tensor,
    gate: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
    eps_w: float,
    inverse: bool,
) -> torch.Tensor:
    """Eq. 6-7 on gated rows (see megatron_rlrt.algorithms.token_weights), A elsewhere, 0 off mask."""
    a = adv.to(torch.float32)[:, None].expand(mask.shape)
    sign = -torch.sign(a) if inverse else torch.sign(a)
    w = torch.exp(sign * (student.float() - teacher.float()))
    mixed = a * ((1.0 - lam) + lam * w.clamp(1.0 - eps_w, 1.0 + eps_w))
    out = torch.where(gate.bool()[:, None], mixed, a)
    return torch.where(mask.bool(), out, torch.zeros_like(out))
