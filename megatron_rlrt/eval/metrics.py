"""avg@k and the unbiased pass@k estimator (Chen et al., 2021)."""

from __future__ import annotations

from math import comb
from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k draws without replacement from n samples, c of them correct, is correct)
    = 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(correct_per_prompt: Sequence[Sequence[bool]], ks: Sequence[int] = (1,)) -> dict[str, float]:
    """avg@n (mean correctness over all samples) and mean pass@k over prompts."""
    if not correct_per_prompt:
        return {}
    n = len(correct_per_prompt[0])
    if any(len(c) != n for c in correct_per_prompt):
        raise ValueError("every prompt needs the same number of samples")
    out = {f"avg@{n}": sum(sum(c) for c in correct_per_prompt) / (n * len(correct_per_prompt))}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(n, sum(c), k) for c in correct_per_prompt) / len(correct_per_prompt)
    return out
