"""Writing outputs so that a failure never leaves something that looks valid.

Every checkpoint / converted model is written into a hidden sibling temp directory and
renamed into place only after everything (on every rank) has been written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator

import torch.distributed as dist


class OutputDirError(ValueError):
    """The requested output location cannot be used."""


def check_output_dir(path: str, overwrite: bool = False) -> None:
    """Refuse a non-empty output directory (unless ``overwrite``) before any work starts."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"{path}: exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise OutputDirError(f"{path}: output directory is not empty (choose a new path or pass --overwrite)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputDirError(f"{path}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputDirError(f"{path}: parent directory {parent} is not writable")


def temp_sibling(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.incomplete")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temp directory to write into; on success it replaces ``path``.

    Collective when torch.distributed is initialised: every rank enters, writes its part,
    and rank 0 renames after a barrier. On an exception the temp dir is removed and
    ``path`` is left exactly as it was.
    """
    tmp = temp_sibling(path)
    if _is_rank0():
        check_output_dir(path, overwrite)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    try:
        yield tmp
    except BaseException:
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if _is_rank0():
        if os.path.isdir(path):
            # overwrite (or an empty dir): move the old one aside, then drop it
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    _barrier()
