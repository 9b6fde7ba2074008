"""Estimators behind the analysis tools (pure functions on numbers; tested against brute force
and hand-computed cases)."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from megatron_rlrt.eval.metrics import pass_at_k


def pass_at_k_curve(correct_counts: Sequence[int], n: int, ks: Iterable[int]) -> dict[int, float]:
    """Mean over problems of Chen et al.'s unbiased pass@k, for every k in ``ks`` (k <= n)."""
    if not correct_counts:
        raise ValueError("no problems to average over")
    return {k: sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in ks}


def curve_ks(n: int) -> list[int]:
    """k = 1..n (the paper's Fig. 8 plots every k up to 256)."""
    return list(range(1, n + 1))


def log_odds_z(e_v: int, x_v: int, e_total: int, x_total: int, alpha: float = 0.5) -> float:
    """Smoothed log-odds z-score of token v between two corpora (paper eq. 8, Monroe et al.):

    delta = log((e + a) / (E - e + a)) - log((x + a) / (X - x + a)),
    Var(delta) ~= 1/(e + a) + 1/(E - e + a) + 1/(x + a) + 1/(X - x + a),  z = delta / sqrt(Var).
    """
    if not (0 <= e_v <= e_total and 0 <= x_v <= x_total):
        raise ValueError(f"need 0 <= e <= E and 0 <= x <= X, got e={e_v}, E={e_total}, x={x_v}, X={x_total}")
    a = alpha
    delta = math.log((e_v + a) / (e_total - e_v + a)) - math.log((x_v + a) / (x_total - x_v + a))
    var = 1 / (e_v + a) + 1 / (e_total - e_v + a) + 1 / (x_v + a) + 1 / (x_total - x_v + a)
    return delta / math.sqrt(var)


def ccdf(values: Sequence[float], thresholds: Sequence[float]) -> list[float]:
    """Fraction of ``values`` strictly above each threshold."""
    if not values:
        return [0.0 for _ in thresholds]
    vs = sorted(values)
    import bisect

    return [(len(vs) - bisect.bisect_right(vs, t)) / len(vs) for t in thresholds]


def topk_overlap(ids_a: Sequence[int], ids_b: Sequence[int], k: int) -> float:
    """|top-k(a) & top-k(b)| / k for two id lists sorted by decreasing probability."""
    return len(set(list(ids_a)[:k]) & set(list(ids_b)[:k])) / k


def sparsity(values: Sequence[float], thresholds: Sequence[float]) -> dict[str, float]:
    """Share of positions whose value exceeds each threshold (paper App. H: critical positions
    are sparse)."""
    return {f">{t:g}": f for t, f in zip(thresholds, ccdf(values, thresholds))}
