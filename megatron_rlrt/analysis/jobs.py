"""Run scoring tasks on model-parallel ranks and hand the per-position results back.

A tool prepares everything that needs no model (problems, rollouts, teacher prompts) in its own
process, then calls :func:`run_scoring` with a list of tasks. The ranks are started the project's
way (``parallel.spawn``: own processes on one machine, or the existing ranks under torchrun),
each loads the checkpoints it needs at the given TP/PP, scores, and the last pipeline stage
broadcasts the results; every caller gets them back.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_rlrt.analysis.checkpoints import CheckpointRef
from megatron_rlrt.analysis.scoring import PositionScores, ScoreItem, ScoreOptions


@dataclass
class ScoreTask:
    """views: ``a`` scores student and teacher rows; policies: ``a`` vs ``b`` on the same rows."""

    mode: str
    a: CheckpointRef
    items: list[ScoreItem]
    b: Optional[CheckpointRef] = None

    def __post_init__(self):
        if self.mode not in ("views", "policies"):
            raise ValueError(f"unknown scoring mode {self.mode!r}; expected 'views' or 'policies'")
        if self.mode == "policies" and self.b is None:
            raise ValueError("policies mode needs a second checkpoint")


@dataclass
class ScoreRun:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    dtype: str = "float32"
    options: ScoreOptions = field(default_factory=ScoreOptions)
    progress: bool = True


def run_scoring(tasks: Sequence[ScoreTask], run: ScoreRun) -> list[dict[int, PositionScores]]:
    """Per task, {item key: PositionScores}. Starts tp x pp ranks (or uses torchrun's)."""
    from megatron_rlrt import parallel

    tasks = list(tasks)
    spec = tasks[0].a.spec()
    spec.check_parallel(run.tensor_model_parallel_size, run.pipeline_model_parallel_size)
    with tempfile.TemporaryDirectory(prefix="rlrt-score-") as tmp:
        out = os.path.join(tmp, "scores.pt")
        parallel.spawn(_score_rank, run.tensor_model_parallel_size * run.pipeline_model_parallel_size,
                       tasks, run, out)
        # Not a checkpoint: our own child wrote it into a private (0700) temporary directory
        # this process created, so no outside file is unpickled here.
        return torch.load(out, weights_only=False)


def _score_rank(tasks: list[ScoreTask], run: ScoreRun, out: str) -> None:
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_rlrt import parallel
    from megatron_rlrt.analysis.checkpoints import load_chunks, load_weights
    from megatron_rlrt.analysis.scoring import score_policies, score_views

    tp, pp = run.tensor_model_parallel_size, run.pipeline_model_parallel_size
    parallel.initialize(parallel.ParallelLayout(tp, pp))
    ok = False
    try:
        loaded: dict[str, tuple] = {}  # slot -> (ref path, chunks): at most two models resident

        def model(slot: str, ref: CheckpointRef):
            if slot not in loaded:
                loaded[slot] = (ref.resolved, load_chunks(ref, tp, pp, run.dtype))
            elif loaded[slot][0] != ref.resolved:
                load_weights(loaded[slot][1], ref)
                loaded[slot] = (ref.resolved, loaded[slot][1])
            return loaded[slot][1]

        show = run.progress and dist.get_rank() == dist.get_world_size() - 1
        bar = tqdm(total=sum(len(t.items) for t in tasks), desc="scoring", unit="rollout", disable=not show,
                   dynamic_ncols=True)
        opts = ScoreOptions(**{**run.options.__dict__, "progress": bar.update})
        results = []
        for task in tasks:
            if task.mode == "views":
                results.append(score_views(model("a", task.a), task.items, opts))
            else:
                results.append(score_policies(model("a", task.a), model("b", task.b), task.items, opts))
        bar.close()
        holder = [results]
        dist.broadcast_object_list(holder, src=dist.get_world_size() - 1)
        # every rank writes its own result path (under torchrun each process has its own)
        tmp_out = f"{out}.{dist.get_rank()}.tmp"
        torch.save(holder[0], tmp_out)
        os.replace(tmp_out, out)
        ok = True
    finally:
        parallel.destroy(barrier=ok)
