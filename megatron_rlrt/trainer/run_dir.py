"""What a run does with its ``--save`` directory: resume, start over, or start beside it.

A run directory that already holds a previous run (checkpoints, metrics.jsonl, TensorBoard
events) is never overwritten by surprise:

* it has a ``checkpoints/latest``: the run resumes from it (default), verified (checkpoint.py);
* ``--overwrite``: the previous run's artifacts are deleted and the run starts from step 0;
* ``--no-auto-resume``: the previous run is kept as it is and this run writes into a new
  subdirectory ``<save>/restart-N`` (said loudly);
* otherwise (artifacts but no ``latest``, e.g. it was deleted): a one-line error that names
  the files and these three choices.
"""

from __future__ import annotations

import os
import shutil

import torch.distributed as dist

from megatron_rlrt.trainer import checkpoint as ckpt

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
RESTART_PREFIX = "restart-"


def previous_run_artifacts(save: str | None) -> list[str]:
    """Paths under ``save`` a previous run left (empty when there is none)."""
    if not save or not os.path.isdir(save):
        return []
    found = []
    root = ckpt.checkpoint_root(save)
    if os.path.isdir(root) and os.listdir(root):
        names = sorted(os.listdir(root))
        found.append(f"{root}/ ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    for name in (METRICS, TENSORBOARD):
        path = os.path.join(save, name)
        if os.path.isfile(path) and os.path.getsize(path) > 0 or os.path.isdir(path) and os.listdir(path):
            found.append(path)
    return found


def has_resume_pointer(save: str | None) -> bool:
    return bool(save) and os.path.isfile(os.path.join(ckpt.checkpoint_root(save), ckpt.LATEST))


def problem(save: str | None, overwrite: bool, no_auto_resume: bool) -> str | None:
    """The one-line refusal for a used --save the flags do not say what to do with, or None."""
    if overwrite or no_auto_resume or has_resume_pointer(save):
        return None
    found = previous_run_artifacts(save)
    if not found:
        return None
    return (f"--save {save} holds a previous run ({'; '.join(found)}) but no {ckpt.LATEST} checkpoint to resume "
            f"from; pass --overwrite to delete it and start over, --no-auto-resume to keep it and start in "
            f"{os.path.join(save, RESTART_PREFIX + 'N')}, or choose another --save")


def _next_restart_dir(save: str) -> str:
    n = 1
    while os.path.exists(os.path.join(save, f"{RESTART_PREFIX}{n}")):
        n += 1
    return os.path.join(save, f"{RESTART_PREFIX}{n}")


def prepare(cfg, log=print) -> str | None:
    """Decide where this run writes (may change ``cfg.save``) and return the checkpoint to
    resume from, or None for a fresh start. Collective: rank 0 decides, every rank follows."""
    from megatron_rlrt.models.qwen3 import CheckpointError

    decision = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        found = previous_run_artifacts(cfg.save)
        if not found:
            decision = ("fresh", cfg.save, None)
        elif cfg.overwrite:
            decision = ("overwrite", cfg.save, None)
        elif cfg.no_auto_resume:
            decision = ("beside", _next_restart_dir(cfg.save), None)
        elif has_resume_pointer(cfg.save):
            decision = ("resume", cfg.save, None)
        else:
            decision = ("refuse", cfg.save, problem(cfg.save, False, False))
    if dist.is_initialized():
        holder = [decision]
        dist.broadcast_object_list(holder, src=0)
        decision = holder[0]
    action, save, message = decision
    if action == "refuse":
        raise CheckpointError(message)
    if action == "overwrite" and (not dist.is_initialized() or dist.get_rank() == 0):
        log(f"--overwrite: deleting the previous run in {cfg.save} ({'; '.join(previous_run_artifacts(cfg.save))})")
        shutil.rmtree(ckpt.checkpoint_root(cfg.save), ignore_errors=True)
        shutil.rmtree(os.path.join(cfg.save, TENSORBOARD), ignore_errors=True)
        if os.path.exists(os.path.join(cfg.save, METRICS)):
            os.remove(os.path.join(cfg.save, METRICS))
    if action == "beside":
        log(f"--no-auto-resume: {cfg.save} holds a previous run, which is kept untouched; this run writes to {save}")
        cfg.save = save
    if dist.is_initialized():
        dist.barrier()
    if action == "resume":
        return ckpt.find_resume_checkpoint(save, log=log)
    return None
