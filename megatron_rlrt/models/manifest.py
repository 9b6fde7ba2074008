"""A checkpoint's manifest: the size and SHA-256 of every file in it, written when the
checkpoint is complete and checked before it is read.

A truncated shard, a garbled JSON file or a torn RNG file is then found up front and named
(instead of surfacing as a 100-line traceback deep inside a loader), and the trainer can fall
back to an older intact checkpoint. The manifest guards against damage (disk, copy, kill),
not against an attacker, who can rewrite it too: see README "Trust and failure".

Hashing is split across the ranks of an initialised process group (every rank hashes every
world_size-th file of the shared directory), so a large checkpoint is hashed in parallel.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch.distributed as dist

MANIFEST = "manifest.json"
FORMAT = "megatron-rlrt-manifest"
_CHUNK = 8 * 1024 * 1024


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST:
                out.append(rel)
    return out


def _split(items: list) -> list:
    """This rank's share of ``items`` (all of them without a process group)."""
    if not dist.is_initialized():
        return items
    return items[dist.get_rank() :: dist.get_world_size()]


def _gather(part: dict) -> dict:
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    out: dict = {}
    for p in parts:
        out.update(p)
    return out


def write_manifest(directory: str) -> None:
    """Hash every file under ``directory`` and write ``manifest.json`` (collective: every rank
    calls it after all ranks finished writing; rank 0 writes the file)."""
    if dist.is_initialized():
        dist.barrier()
    names = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        names = _files(directory)
    if dist.is_initialized():
        holder = [names]
        dist.broadcast_object_list(holder, src=0)
        names = holder[0]
    mine = {n: {"size": os.path.getsize(os.path.join(directory, n)), "sha256": sha256_of(os.path.join(directory, n))}
            for n in _split(names)}
    files = _gather(mine)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = os.path.join(directory, MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "version": 1, "files": {n: files[n] for n in sorted(files)}}, f, indent=1)
        os.replace(tmp, os.path.join(directory, MANIFEST))
    if dist.is_initialized():
        dist.barrier()


def read_manifest(directory: str) -> dict[str, dict] | None:
    """The manifest's {relative path: {size, sha256}}; None when the checkpoint has none (written
    before manifests existed). Raises ValueError naming the file when it is unreadable."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        files = data["files"]
        if data.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {data.get('format')!r}")
        for entry in files.values():
            int(entry["size"]), str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: damaged manifest ({type(exc).__name__}: {exc})") from None
    return files


def verify_manifest(directory: str, hashes: bool = True) -> str | None:
    """Check every file the manifest lists (size, then SHA-256). Returns None when the
    checkpoint is intact, else one line naming the first damaged file. Collective when a
    process group is initialised (every rank gets the same answer). A checkpoint without a
    manifest is reported by :func:`read_manifest` returning None, not here."""
    try:
        files = read_manifest(directory) or {}
        error = None
    except ValueError as exc:
        files, error = {}, str(exc)
    problems = {}
    for name in _split(sorted(files)):
        path = os.path.join(directory, name)
        want = files[name]
        if not os.path.isfile(path):
            problems[name] = f"{path}: missing (listed in {MANIFEST})"
        elif os.path.getsize(path) != int(want["size"]):
            problems[name] = f"{path}: {os.path.getsize(path)} bytes, {MANIFEST} says {want['size']} (truncated or damaged)"
        elif hashes and sha256_of(path) != want["sha256"]:
            problems[name] = f"{path}: SHA-256 differs from {MANIFEST} (damaged)"
    problems = _gather(problems)
    if error:
        return error
    return problems[min(problems)] if problems else None
