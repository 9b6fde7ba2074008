"""Training checkpoints: model + optimizer (dist_checkpointing) + everything that makes a
resumed run continue exactly where it stopped.

    <save>/checkpoints/
        latest                  name of the newest COMPLETE checkpoint (replaced atomically)
        iter_0000010/
            metadata.json, hf/, model/     as a model checkpoint (tools/ can convert it)
            optim/                         megatron optimizer, dist_checkpointing
            teacher_ema/                   the EMA teacher's weights (--teacher-weights ema)
            trainer_state.json             step, LR scheduler, data position, lambda schedule
            rng/rank_00000.pt              per-rank RNG states (torch, CUDA, python, numpy,
                                           megatron's tracker, the rollout sampler on rank 0)

A checkpoint is written into a hidden temp directory and renamed when every rank has
finished; ``latest`` moves only after that, and old checkpoints are pruned only after that.
A kill at any moment therefore leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from megatron_rlrt.fsutil import atomic_output_dir, temp_sibling
from megatron_rlrt.models.megatron_checkpoint import (
    HF_DIR,
    MODEL_DIR,
    copy_hf_config_dir,
    read_metadata,
    read_model_dir,
    sharded_model_state,
    write_metadata,
    write_model_dir,
)

OPTIM_DIR = "optim"
# The distributed optimizer's default 'fully_sharded_model_space' format uses flattened
# ShardedTensors, which dist_checkpointing 0.19 refuses; 'dp_reshardable' stores each DP rank's
# buffer shards (resume needs the same TP/PP; the model part reshards freely).
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
STATE_FILE = "trainer_state.json"
TEACHER_EMA_DIR = "teacher_ema"
LATEST = "latest"


def checkpoint_root(save: str) -> str:
    return os.path.join(save, "checkpoints")


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(save: str | None) -> str | None:
    """Path of the newest complete checkpoint under ``save``, or None."""
    if not save:
        return None
    root = checkpoint_root(save)
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        path = os.path.join(root, f.read().strip())
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise RuntimeError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def _rng_state(extra: dict | None) -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state.update(extra or {})
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(save: str, step: int, chunks, optimizer, scheduler, spec, hf_dir: str, trainer_state: dict,
                    rng_extra: dict | None = None, keep_last: int = 2, snapshots: dict | None = None) -> str:
    """Write checkpoint ``step`` (collective). Returns its path. ``snapshots``: directory name ->
    WeightSnapshot of other weights the run keeps (saved like the model, at any TP/PP)."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(save)
    path = os.path.join(root, iter_name(step))
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
    dist.barrier()
    with atomic_output_dir(path, overwrite=True) as tmp:
        model_sd = sharded_model_state(chunks)
        write_model_dir(chunks, os.path.join(tmp, MODEL_DIR))
        os.makedirs(os.path.join(tmp, OPTIM_DIR), exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(optimizer.sharded_state_dict(model_sd, metadata=OPTIM_METADATA),
                                os.path.join(tmp, OPTIM_DIR))
        for name, snapshot in (snapshots or {}).items():
            snapshot.save(chunks, os.path.join(tmp, name))
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(_rng_state(rng_extra), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
        if rank == 0:
            os.makedirs(os.path.join(tmp, HF_DIR))
            copy_hf_config_dir(hf_dir, os.path.join(tmp, HF_DIR))
            write_metadata(tmp, spec, step=step)
            state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": dist.get_world_size(),
                     **trainer_state}
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=2, default=str)
    if rank == 0:
        pointer = os.path.join(root, LATEST)
        with open(pointer + ".tmp", "w", encoding="utf-8") as f:
            f.write(iter_name(step))
        os.replace(pointer + ".tmp", pointer)
        _prune(root, keep_last)
    dist.barrier()
    return path


def _prune(root: str, keep_last: int) -> None:
    names = sorted(n for n in os.listdir(root) if n.startswith("iter_") and os.path.isdir(os.path.join(root, n)))
    for name in names[: max(0, len(names) - max(1, keep_last))]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for name in os.listdir(root):  # leftovers of a save that was killed
        if name.endswith(".incomplete") or name.endswith(".incomplete.old"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer the per-parameter state a checkpoint load expects.

    With torch's Adam (no apex/TE, i.e. on a CPU) megatron's DistributedOptimizer.state_dict()
    reads a 'step' from every parameter's state, and its init_state_fn creates the moments but
    no step; the loaded checkpoint then overwrites all of it.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner, init = getattr(opt, "optimizer", None), getattr(opt, "init_state_fn", None)
        if inner is None or init is None:
            continue
        init(inner, getattr(opt, "config", None))
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.tensor(0.0))


def load_checkpoint(path: str, chunks, optimizer, scheduler) -> tuple[dict, dict | None]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns (trainer_state, rng)."""
    from megatron.core import dist_checkpointing

    read_metadata(path)
    _materialize_optimizer_state(optimizer)
    read_model_dir(chunks, os.path.join(path, MODEL_DIR))
    model_sd = sharded_model_state(chunks)
    optim_state = dist_checkpointing.load(optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                       metadata=OPTIM_METADATA),
                                          os.path.join(path, OPTIM_DIR))
    with torch.no_grad():  # fp32 training: the optimizer's main params are views of the model's
        optimizer.load_state_dict(optim_state)
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    scheduler.load_state_dict(state["scheduler"])
    rng = None
    rng_file = os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.pt")
    if state.get("world_size") == dist.get_world_size() and os.path.isfile(rng_file):
        rng = torch.load(rng_file, weights_only=False)
        _set_rng_state(rng)
    return state, rng


def is_incomplete(path: str) -> bool:
    return os.path.exists(temp_sibling(path))
