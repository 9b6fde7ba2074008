"""Metrics: one dict per RL step -> <run>/metrics.jsonl, TensorBoard, optional wandb, console.

Only rank 0 writes. ``reduce_to_rank0`` merges every rank's ``MetricSums`` (e.g. loss terms
that exist only on the last pipeline stage) as weighted means.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist


class MetricSums:
    """Metrics as {name: (value sum, weight)}, mergeable across micro-batches and ranks; the
    one type the update, the loss and the rank-0 reduction share.

    A name ending in ``_max`` keeps the maximum (weight 1), ``_total`` a plain sum (weight 1);
    any other is a weighted mean, ``sum of values / sum of weights``.
    """

    def __init__(self, sums: dict[str, tuple[float, float]] | None = None):
        self.sums: dict[str, tuple[float, float]] = {}
        for name, (value, weight) in (sums or {}).items():
            self.add(name, value, weight)

    def add(self, name: str, value: float, weight: float = 1.0) -> None:
        if name.endswith("_max"):
            self.sums[name] = (max(self.sums.get(name, (-math.inf, 1.0))[0], value), 1.0)
        elif name.endswith("_total"):
            self.sums[name] = (self.sums.get(name, (0.0, 1.0))[0] + value, 1.0)
        else:
            total, weights = self.sums.get(name, (0.0, 0.0))
            self.sums[name] = (total + value, weights + weight)

    def merge(self, other: "MetricSums") -> "MetricSums":
        for name, (value, weight) in other.sums.items():
            self.add(name, value, weight)
        return self

    def means(self) -> dict[str, float]:
        return {k: (v / w if w else float("nan")) for k, (v, w) in self.sums.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.sums


def reduce_to_rank0(sums: MetricSums) -> dict[str, float]:
    """Every rank's ``MetricSums`` merged (in rank order) -> {name: value} on rank 0, {} elsewhere."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(sums.sums, gathered, dst=0)
    if dist.get_rank() != 0:
        return {}
    total = MetricSums()
    for part in gathered:
        total.merge(MetricSums(part))
    return total.means()


class MetricsWriter:
    """Writes on rank 0; a no-op elsewhere. metrics.jsonl is appended and flushed per step, so
    a crash loses at most the step in flight; on resume, rows past the resumed step are dropped."""

    def __init__(self, run_dir: str | None, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None, resume_step: int = 0):
        self.enabled = run_dir is not None and (not dist.is_initialized() or dist.get_rank() == 0)
        self.path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
        self.tb = self.wandb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=config or {}, dir=run_dir, resume="allow")

    def _truncate_after(self, step: int) -> None:
        """Keep only rows with step <= ``step`` (steps logged after the last checkpoint re-run)."""
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(rows)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# (label, metric, format) of the console line; a column shows only when the step logged its
# metric, so each method's line has the columns it produces (no lambda or w without a token weight)
CONSOLE_COLUMNS = (("reward", "reward/mean", "{:.3f}"), ("pass-groups", "reward/pass_rate_groups", "{:.2f}"),
                   ("len", "response/length_mean", "{:.1f}"), ("lambda", "rlrt/lambda", "{:.2f}"),
                   ("w", "rlrt/weight_mean", "{:.3f}"), ("pg", "loss/pg", "{:.4f}"), ("ent", "actor/entropy", "{:.3f}"),
                   ("gnorm", "actor/grad_norm", "{:.3f}"))


def console_line(step: int, total: int, m: dict) -> str:
    def g(k, fmt):
        v = m[k]
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    cols = [f"{label} {g(key, fmt)}" for label, key, fmt in CONSOLE_COLUMNS if key in m]
    time_s = g("perf/step_time_s", "{:.1f}") if "perf/step_time_s" in m else "-"
    return " | ".join([f"step {step}/{total}", *cols, f"{time_s}s"])


@contextmanager
def phase(name: str, enabled: bool) -> Iterator[None]:
    """A one-line spinner/bar for a phase of the step on rank 0 (tqdm, cleared when done)."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc=name, leave=False, dynamic_ncols=True, bar_format="{desc}: {elapsed}")
    try:
        yield
    finally:
        bar.update(1)
        bar.close()
