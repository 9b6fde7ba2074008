"""Training checkpoints: model + optimizer (dist_checkpointing) + everything that makes a
resumed run continue exactly where it stopped.

    <save>/checkpoints/
        latest                  name of the newest COMPLETE checkpoint (replaced atomically)
        iter_0000010/
            metadata.json, hf/, model/     as a model checkpoint (tools/ can convert it)
            optim/                         megatron optimizer, dist_checkpointing
            teacher_ema/                   the EMA teacher's weights (--teacher-weights ema)
            trainer_state.json             step, LR scheduler, data position, lambda schedule
            rng/rank_00000.safetensors     per-rank RNG states (torch, CUDA, python, numpy,
                                           megatron's tracker, the rollout sampler on rank 0)
            manifest.json                  size + SHA-256 of every file above

A checkpoint is written into a hidden temp directory, hashed into its manifest, and renamed
when every rank has finished; ``latest`` moves only after that, and old checkpoints are pruned
only after that. A kill at any moment therefore leaves the previous checkpoint loadable.

Nothing here is a pickle of ours (RNG: safetensors; trainer state: JSON). On resume the
manifest is checked first: a damaged latest checkpoint is named and the newest intact one is
used instead, loudly; when none is intact the run stops with one line naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from megatron_rlrt.fsutil import atomic_output_dir, temp_sibling
from megatron_rlrt.models.manifest import read_manifest, verify_manifest, write_manifest
from megatron_rlrt.models.megatron_checkpoint import (
    HF_DIR,
    MODEL_DIR,
    copy_hf_config_dir,
    read_metadata,
    load_dcp_dir,
    read_model_dir,
    sharded_model_state,
    write_metadata,
    write_model_dir,
)
from megatron_rlrt.models.qwen3 import CheckpointError
from megatron_rlrt.trainer import rng_state

OPTIM_DIR = "optim"
METADATA_FILE = "metadata.json"
# The distributed optimizer's default 'fully_sharded_model_space' format uses flattened
# ShardedTensors, which dist_checkpointing 0.19 refuses; 'dp_reshardable' stores each DP rank's
# buffer shards (resume needs the same TP/PP; the model part reshards freely).
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
STATE_FILE = "trainer_state.json"
TEACHER_EMA_DIR = "teacher_ema"
REFERENCE_DIR = "reference"  # the KL reference when --ref-update-interval moves it
LATEST = "latest"


def checkpoint_root(save: str) -> str:
    return os.path.join(save, "checkpoints")


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(save: str | None) -> str | None:
    """Path of the checkpoint ``latest`` names under ``save`` (None: no pointer, or it names
    no directory). Use :func:`find_resume_checkpoint` to resume: it also verifies."""
    found = _latest_pointer(save)
    if found is None:
        return None
    path = os.path.join(found[0], _read_pointer(found[1]))
    return path if os.path.isdir(path) else None


def _latest_pointer(save: str | None) -> tuple[str, str] | None:
    """(checkpoint root, path of its ``latest`` file), or None when there is no such file."""
    if not save:
        return None
    root = checkpoint_root(save)
    pointer = os.path.join(root, LATEST)
    return (root, pointer) if os.path.isfile(pointer) else None


def _read_pointer(pointer: str) -> str:
    try:
        with open(pointer, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer}: unreadable ({exc})") from None


def _step_of(name: str) -> int | None:
    m = re.fullmatch(r"iter_(\d+)", name)
    return int(m.group(1)) if m else None


def checkpoint_dirs(save: str) -> list[str]:
    """Complete checkpoint directories under ``save``, newest first."""
    root = checkpoint_root(save)
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if _step_of(n) is not None and os.path.isdir(os.path.join(root, n))]
    return [os.path.join(root, n) for n in sorted(names, key=_step_of, reverse=True)]


def checkpoint_problem(path: str) -> str | None:
    """None when ``path`` is an intact checkpoint, else one line naming the damaged file.
    Collective (the hashing is split over the ranks)."""
    try:
        has_manifest = read_manifest(path) is not None
    except ValueError as exc:
        has_manifest, problem = True, str(exc)
    else:
        problem = verify_manifest(path) if has_manifest else None
    if problem:
        return problem
    if not has_manifest:  # written before manifests existed: check what can be parsed
        for name in (STATE_FILE, METADATA_FILE):
            file = os.path.join(path, name)
            try:
                with open(file, encoding="utf-8") as f:
                    json.load(f)
            except (OSError, ValueError) as exc:
                return f"{file}: unreadable ({type(exc).__name__}: {exc})"
    return None


def find_resume_checkpoint(save: str | None, log=print) -> str | None:
    """The checkpoint a run resumes from: the one ``latest`` names if it is intact, else (with
    a loud message naming the damaged file) the newest intact older one. None when ``save``
    holds no ``latest``. Raises CheckpointError naming the damage when no checkpoint is intact:
    a run that should resume never silently starts from scratch. Collective."""
    found = _latest_pointer(save)
    if found is None:
        return None
    root, pointer = found
    target = _read_pointer(pointer)
    dirs = checkpoint_dirs(save)
    damage = []
    if _step_of(target) is None or not os.path.isdir(os.path.join(root, target)):
        damage.append(f"{pointer} names {target!r}, which is not a checkpoint directory")
        candidates = dirs
    else:
        limit = _step_of(target)
        candidates = [d for d in dirs if _step_of(os.path.basename(d)) <= limit]
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if damage:
                log(f"WARNING: {'; '.join(damage)}. Resuming from the newest intact checkpoint, {path}")
            if read_manifest(path) is None:
                log(f"note: {path} has no manifest.json (written by an older version): its files are not verified")
            return path
        damage.append(f"checkpoint {os.path.basename(path)} is damaged: {problem}")
    raise CheckpointError(f"no intact checkpoint to resume from in {root}: " + "; ".join(damage)
                          + " (restore the files, or pass --overwrite to start this run directory over)")


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


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
        os.makedirs(os.path.join(tmp, rng_state.RNG_DIR), exist_ok=True)
        rng_state.save(rng_state.rng_file(tmp, rank), rng_extra)
        if rank == 0:
            os.makedirs(os.path.join(tmp, HF_DIR))
            copy_hf_config_dir(hf_dir, os.path.join(tmp, HF_DIR))
            write_metadata(tmp, spec, step=step)
            state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": dist.get_world_size(),
                     "use_distributed_optimizer": _uses_distributed_optimizer(optimizer), **trainer_state}
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=2, default=str)
        write_manifest(tmp)  # collective; after every rank's files are written
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


def _read_state(path: str) -> dict:
    file = os.path.join(path, STATE_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
        int(state["step"]), state["scheduler"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: unreadable trainer state ({type(exc).__name__}: {exc})") from None
    return state


def _check_optimizer_layout(path: str, meta: dict, state: dict, optimizer) -> None:
    """The distributed optimizer's state (dp_reshardable) loads only at the layout it was saved
    at: say so in one line instead of dist_checkpointing's 150-line CheckpointingException."""
    from megatron.core import parallel_state as ps

    if not (state.get("use_distributed_optimizer") or _uses_distributed_optimizer(optimizer)):
        return
    saved = (meta.get("saved_tensor_model_parallel_size"), meta.get("saved_pipeline_model_parallel_size"),
             state.get("world_size"), bool(state.get("use_distributed_optimizer", True)))
    now = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
           dist.get_world_size(), _uses_distributed_optimizer(optimizer))
    if saved != now:
        fmt = "TP={} PP={} world size {} distributed optimizer {}"
        raise CheckpointError(
            f"{path}: optimizer state saved at {fmt.format(*saved)}, this run has {fmt.format(*now)}; the "
            "distributed optimizer's state only resumes at the same layout (or pass --load "
            f"{path} with a new --save to start a run from its weights at any layout)")


def load_checkpoint(path: str, chunks, optimizer, scheduler, log=print) -> tuple[dict, dict | None]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns (trainer_state, the
    saved rollout/peer generator states of rank 0 or None)."""
    from megatron.core import parallel_state as ps

    meta = read_metadata(path)
    state = _read_state(path)
    _check_optimizer_layout(path, meta, state, optimizer)
    _materialize_optimizer_state(optimizer)
    read_model_dir(chunks, os.path.join(path, MODEL_DIR))
    model_sd = sharded_model_state(chunks)
    optim_dir = os.path.join(path, OPTIM_DIR)
    optim_state = load_dcp_dir(optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIM_METADATA),
                               optim_dir)
    with torch.no_grad():  # fp32 training: the optimizer's main params are views of the model's
        optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(state["scheduler"])
    rank = dist.get_rank()
    same_layout = (state.get("world_size") == dist.get_world_size()
                   and meta.get("saved_tensor_model_parallel_size") == ps.get_tensor_model_parallel_world_size()
                   and meta.get("saved_pipeline_model_parallel_size") == ps.get_pipeline_model_parallel_world_size())
    generators = None
    try:
        if same_layout and os.path.isfile(rng_state.rng_file(path, rank)):
            rng = rng_state.load(rng_state.rng_file(path, rank))
            rng.apply()
        elif rank == 0:
            log(f"WARNING: RNG state not restored: {path} was saved at TP={meta.get('saved_tensor_model_parallel_size')}"
                f" PP={meta.get('saved_pipeline_model_parallel_size')} world size {state.get('world_size')}, this "
                f"run has TP={ps.get_tensor_model_parallel_world_size()} PP={ps.get_pipeline_model_parallel_world_size()}"
                f" world size {dist.get_world_size()} (or it has no RNG files); dropout and sampling continue from "
                "fresh seeds, so this run will not repeat an uninterrupted one bit for bit")
        if rank == 0 and os.path.isfile(rng_state.rng_file(path, 0)):  # rank 0's samplers: any layout
            rng0 = rng_state.load(rng_state.rng_file(path, 0))
            generators = {k: v for k in ("rollout_generator", "peer_generator")
                          if (v := rng0.generator(k)) is not None}
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return state, generators


def is_incomplete(path: str) -> bool:
    return os.path.exists(temp_sibling(path))
