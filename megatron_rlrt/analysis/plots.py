"""Every figure of the analysis tools (matplotlib, Agg backend, PNG files).

Colours follow the paper: green = explore / critical (high D_bar_t), pink = exploit / routine.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

EXPLORE = "#2ca02c"
EXPLOIT = "#e377c2"
MARKERS = {"max_kl": "s", "random": "o", "min_kl": "^"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    import warnings

    with warnings.catch_warnings():  # tokens in scripts the default font lacks are drawn as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        warnings.filterwarnings("ignore", message=".*tight_layout.*")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def passk_curves(curves: Mapping[str, Mapping[str, Mapping[int, float]]], path: str, title: str = "") -> str:
    """``curves[benchmark][checkpoint] = {k: pass@k}``: one panel per benchmark, one line per
    checkpoint, log2 k axis (paper Fig. 8)."""
    plt = _plt()
    benches = list(curves)
    fig, axes = plt.subplots(1, len(benches), figsize=(4.2 * len(benches), 3.4), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        for label, curve in curves[bench].items():
            ks = sorted(curve)
            ax.plot(ks, [100 * curve[k] for k in ks], marker="o" if len(ks) <= 16 else None, ms=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_title(bench)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def asymmetry_heatmap(tokens: Sequence[str], values: Sequence[float], path: str, title: str = "",
                      per_row: int = 24) -> str:
    """Tokens on a grid shaded by D_bar_t (pink = small, green = large; paper App. H)."""
    plt = _plt()
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("asym", ["#fde0ef", "#ffffff", "#a1d99b", "#006d2c"])
    vmax = max(max(values, default=0.0), 1e-12)
    per_row = max(1, min(per_row, len(tokens)))
    rows = max(1, math.ceil(len(tokens) / per_row))
    fig, ax = plt.subplots(figsize=(max(4.0, min(16, 0.62 * per_row + 1.5)), 0.32 * rows + 0.9))
    for i, (tok, v) in enumerate(zip(tokens, values)):
        r, c = divmod(i, per_row)
        ax.add_patch(plt.Rectangle((c, -r - 1), 1, 1, color=cmap(min(1.0, math.sqrt(max(v, 0) / vmax)))))
        label = tok.replace("\n", "\\n").replace("$", r"\$")[:7]
        ax.text(c + 0.5, -r - 0.5, label, ha="center", va="center", fontsize=5.5, family="monospace")
    ax.set_xlim(0, per_row)
    ax.set_ylim(-rows, 0)
    ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, vmax))
    fig.colorbar(sm, ax=ax, fraction=0.02, pad=0.01, label="D_bar_t (nats)")
    if title:
        ax.set_title(title, fontsize=8)
    return _save(fig, path)


def volcano(rows: Sequence[dict], path: str, z_threshold: float = 3.0, label_top: int = 12) -> str:
    """rows: {token, explore, exploit, z}. x = log2(n_explore / n_exploit) (smoothed by 0.5),
    y = log10(total); |z| >= threshold coloured (paper Fig. 3a)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [math.log2((r["explore"] + 0.5) / (r["exploit"] + 0.5)) for r in rows]
    ys = [math.log10(r["explore"] + r["exploit"]) for r in rows]
    colors = [EXPLORE if r["z"] >= z_threshold else EXPLOIT if r["z"] <= -z_threshold else "#bbbbbb" for r in rows]
    ax.scatter(xs, ys, c=colors, s=10, alpha=0.8, linewidths=0)
    ranked = sorted(range(len(rows)), key=lambda i: -abs(rows[i]["z"]))
    for i in ranked[:label_top]:
        if abs(rows[i]["z"]) >= z_threshold:
            ax.annotate(rows[i]["token"].strip() or repr(rows[i]["token"]), (xs[i], ys[i]), fontsize=7)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("log2(n_explore / n_exploit)")
    ax.set_ylabel("log10(n_explore + n_exploit)")
    ax.set_title(f"explore (green) / exploit (pink) tokens, |z| >= {z_threshold:g}", fontsize=9)
    return _save(fig, path)


def reflection_flips(steps: Sequence, rates: Mapping[str, Mapping[str, Sequence[float]]], path: str) -> str:
    """``rates["flip_to_R"|"flip_to_W"][position] = [rate per checkpoint]`` (paper Fig. 6)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.3))
    for ax, (key, title) in zip(axes, (("flip_to_R", "(a) flip->R on hard subset"),
                                       ("flip_to_W", "(b) flip->W on easy subset"))):
        for pos, values in rates.get(key, {}).items():
            ys = [float("nan") if v is None else 100 * v for v in values]
            ax.plot(range(len(steps)), ys, marker=MARKERS.get(pos, "o"), label=pos)
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7, rotation=20)
        ax.set_xlabel("checkpoint")
        ax.set_ylabel("rate (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def distribution_shift(panels: Mapping[str, dict], path: str, js_threshold: float = 0.1) -> str:
    """``panels[checkpoint] = {"ccdf": (xs, ys), "overlap": (ks, ys), "depth": (thresholds, ys)}``
    (paper Fig. 7 a-c)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for label, p in panels.items():
        xs, ys = p["ccdf"]
        axes[0].plot(xs, ys, label=label)
        ks, ov = p["overlap"]
        axes[1].plot(ks, ov, marker="o", ms=3, label=label)
        th, fr = p["depth"]
        axes[2].plot(th, fr, marker="o", ms=3, label=label)
    axes[0].axvline(js_threshold, ls="--", color="k", lw=0.8)
    axes[0].set_xscale("log")
    if any(y > 0 for p in panels.values() for y in p["ccdf"][1]):
        axes[0].set_yscale("log")
    axes[0].set_xlabel("JS(pi_ft || pi_base)")
    axes[0].set_ylabel("fraction of positions > x")
    axes[0].set_title("(a) CCDF of JS", fontsize=9)
    axes[1].set_xlabel("k")
    axes[1].set_ylabel("top-k overlap")
    axes[1].set_title(f"(b) top-k overlap at JS > {js_threshold:g}", fontsize=9)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("base probability threshold")
    axes[2].set_ylabel("fraction of positions")
    axes[2].set_title("(c) new top-1 with base prob < threshold", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
