"""Checkpoints cannot run code when loaded, are verified against their manifest, and a damaged
latest checkpoint falls back to the newest intact one (loudly) or stops with one line naming
the file: never a silent fresh start (issue #13, items 1 and 3)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil

import pytest

from tests.conftest import run_cli, tiny_train_args


class _Exploit:
    """A pickle whose loading runs a shell command (creates ``marker``)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_bytes(marker) -> bytes:
    return pickle.dumps(_Exploit(str(marker)))


def _cli(*args):
    return run_cli(*args)


def _train_args(model, data, run, iters):
    return tiny_train_args(model, data, run, iters)


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _iter(run, step):
    return run / "checkpoints" / f"iter_{step:07d}"


def _rewrite_manifest(ckpt):
    """What an attacker does after editing a file: make the manifest agree."""
    from megatron_rlrt.models.manifest import write_manifest

    write_manifest(str(ckpt))


# -- 1. nothing in a checkpoint can run code --------------------------------------------------

def test_checkpoint_files_are_not_pickles(trained_run):
    ckpt = _iter(trained_run, 2)
    from safetensors import safe_open

    rng = ckpt / "rng" / "rank_00000.safetensors"
    with safe_open(str(rng), framework="pt") as f:
        assert {"torch", "python/key", "numpy/key"} <= set(f.keys())
    assert not list(ckpt.rglob("*.pt"))
    json.loads((ckpt / "trainer_state.json").read_text())
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert "rng/rank_00000.safetensors" in manifest and "optim/.metadata" in manifest
    assert manifest["trainer_state.json"]["size"] == (ckpt / "trainer_state.json").stat().st_size


def test_malicious_rng_file_is_refused_and_never_runs(tmp_path):
    from megatron_rlrt.trainer import rng_state

    marker = tmp_path / "pwned"
    evil = tmp_path / "rank_00000.safetensors"
    evil.write_bytes(_evil_bytes(marker))
    assert not marker.exists()
    with pytest.raises(ValueError, match="rank_00000.safetensors: not a readable RNG state file"):
        rng_state.load(str(evil))
    assert not marker.exists()
    pickle.loads(_evil_bytes(marker))  # the payload is real: unpickling it does run the command
    assert marker.exists()


def test_crafted_distributed_checkpoint_metadata_is_refused(trained_run, tmp_path):
    from megatron_rlrt.models.megatron_checkpoint import check_dcp_metadata
    from megatron_rlrt.models.qwen3 import CheckpointError

    check_dcp_metadata(str(_iter(trained_run, 2) / "model"))  # torch's own metadata passes
    check_dcp_metadata(str(_iter(trained_run, 2) / "optim"))
    marker = tmp_path / "pwned"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / ".metadata").write_bytes(_evil_bytes(marker))
    with pytest.raises(CheckpointError, match=r"model/.metadata: refused to load"):
        check_dcp_metadata(str(tmp_path / "model"))
    assert not marker.exists()


def test_distributed_checkpoint_objects_load_weights_only(tmp_path):
    """DCP's own load_bytes uses torch.load(weights_only=False); ours must not run a pickle."""
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from megatron_rlrt.models.megatron_checkpoint import weights_only_dcp_objects

    weights_only_dcp_objects()
    marker = tmp_path / "pwned"
    planner = DefaultLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}

    class Item:
        class dest_index:
            fqn = "common_state"

    buf = io.BytesIO()
    torch.save({"step": torch.tensor(3), "lr": 0.5}, buf)
    buf.seek(0)
    planner.load_bytes(Item, buf)
    assert planner.state_dict["common_state"]["lr"] == 0.5
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(Item, io.BytesIO(_evil_bytes(marker)))
    assert not marker.exists()


def test_resume_with_a_crafted_rng_file_stops_without_running_it(trained_run, tiny_model, arithmetic_data, tmp_path):
    """The attack of issue #13: a pickle in rng/ (old name and new name, manifest rewritten to
    match) must not run when the run resumes; the resume stops with one line naming the file."""
    run = _copy(trained_run, tmp_path)
    marker = tmp_path / "pwned"
    rng_dir = _iter(run, 2) / "rng"
    (rng_dir / "rank_00000.pt").write_bytes(_evil_bytes(marker))
    (rng_dir / "rank_00000.safetensors").write_bytes(_evil_bytes(marker))
    _rewrite_manifest(_iter(run, 2))
    r = _cli(*_train_args(tiny_model, arithmetic_data, run, 3))
    assert not marker.exists(), "the checkpoint ran code"
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank_00000.safetensors" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr


# -- 3. damaged checkpoints: named, fallback to the newest intact one ---------------------------

@pytest.mark.parametrize("damage", ["truncated_shard", "garbled_state", "truncated_rng", "missing_file"])
def test_damaged_latest_falls_back_to_newest_intact(trained_run, tmp_path, damage):
    from megatron_rlrt.trainer import checkpoint as ckpt

    run = _copy(trained_run, tmp_path)
    latest = _iter(run, 2)
    target = {"truncated_shard": latest / "model" / "__0_0.distcp", "garbled_state": latest / "trainer_state.json",
              "truncated_rng": latest / "rng" / "rank_00000.safetensors",
              "missing_file": latest / "optim" / ".metadata"}[damage]
    if damage == "garbled_state":
        target.write_text(target.read_text().replace('"step": 2', '"step": 9'))  # same size, other bytes
    elif damage == "missing_file":
        target.unlink()
    else:
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    logs = []
    assert ckpt.find_resume_checkpoint(str(run), log=logs.append) == str(_iter(run, 1))
    assert len(logs) == 1 and str(target) in logs[0] and "Resuming from the newest intact checkpoint" in logs[0], logs


def test_latest_naming_a_missing_directory_falls_back(trained_run, tmp_path):
    from megatron_rlrt.trainer import checkpoint as ckpt

    run = _copy(trained_run, tmp_path)
    shutil.rmtree(_iter(run, 2))
    logs = []
    assert ckpt.find_resume_checkpoint(str(run), log=logs.append) == str(_iter(run, 1))
    assert "names 'iter_0000002', which is not a checkpoint directory" in logs[0]


def test_no_intact_checkpoint_is_one_error_naming_the_files(trained_run, tiny_model, arithmetic_data, tmp_path):
    """Every checkpoint damaged: the CLI stops with one line naming the damaged files and changes
    nothing (no fresh start over the old run)."""
    run = _copy(trained_run, tmp_path)
    for step in (1, 2):
        shard = _iter(run, step) / "model" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = _cli(*_train_args(tiny_model, arithmetic_data, run, 3))
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert str(_iter(run, 2) / "model" / "__0_0.distcp") in errors[0]
    assert str(_iter(run, 1) / "model" / "__0_0.distcp") in errors[0]
    assert "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_after_damage_continues_from_the_intact_checkpoint(trained_run, tiny_model, arithmetic_data, tmp_path):
    run = _copy(trained_run, tmp_path)
    shard = _iter(run, 2) / "model" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    r = _cli(*_train_args(tiny_model, arithmetic_data, run, 3))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert f"{shard}" in out and "Resuming from the newest intact checkpoint" in out
    assert f"resumed from {_iter(run, 1)} (step 1)" in out
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000003"


def test_damage_in_a_checkpoint_without_manifest_is_one_line(trained_run, tiny_model, arithmetic_data, tmp_path):
    """Checkpoints written before manifests existed: a truncated shard is still one line naming
    the directory, not megatron's 100-line traceback."""
    run = _copy(trained_run, tmp_path)
    for step in (1, 2):
        (_iter(run, step) / "manifest.json").unlink()
    shard = _iter(run, 2) / "optim" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:200])
    r = _cli(*_train_args(tiny_model, arithmetic_data, run, 3))
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{_iter(run, 2) / 'optim'}: cannot load this distributed checkpoint" in errors[0]
    assert "has no manifest.json" in r.stdout


def test_model_checkpoint_manifest_is_checked_on_load(tiny_model, tmp_path):
    """tools/convert_* and --load/--ref-load read model checkpoints through load_model_checkpoint,
    which checks the manifest the converter wrote."""
    from megatron_rlrt.convert import hf_to_megatron, megatron_to_hf
    from megatron_rlrt.models.manifest import verify_manifest
    from megatron_rlrt.models.qwen3 import CheckpointError

    out = tmp_path / "mc"
    hf_to_megatron(tiny_model, str(out), 1, 1, None, False)
    assert (out / "manifest.json").is_file() and verify_manifest(str(out)) is None
    shard = out / "model" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=f"{shard}: .* bytes, manifest.json says"):
        megatron_to_hf(str(out), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


# -- layout changes: said up front, in one line -------------------------------------------------

def _torchrun(*args):
    from tests.helpers.torchrun import torchrun

    return torchrun(["-m", "megatron_rlrt.trainer.cli", *args], timeout=1200)


def test_resume_at_another_layout(trained_run, tiny_model, arithmetic_data, tmp_path):
    """Saved at TP=1 on 1 rank. At TP=2 the run resumes and says the RNG state was not restored;
    with the distributed optimizer (whose state only loads at its own layout) it stops with one
    line naming the checkpoint, from rank 0 only."""
    run = _copy(trained_run, tmp_path)
    base = tiny_train_args(tiny_model, arithmetic_data, run, 3) + ["--tensor-model-parallel-size", "2"]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = _torchrun(*base, "--use-distributed-optimizer")
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "megatron_rlrt/" not in r.stderr, r.stderr[-4000:]
    assert f"{_iter(run, 2)}: optimizer state saved at TP=1 PP=1 world size 1 distributed optimizer False" in errors[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    r = _torchrun(*base)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "WARNING: RNG state not restored" in r.stdout and f"resumed from {_iter(run, 2)} (step 2)" in r.stdout
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000003"
