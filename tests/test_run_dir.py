"""A used --save is never overwritten by surprise (issue #13, item 2): resumed from its latest
checkpoint, refused in one line, kept beside a --no-auto-resume run, or deleted only with
--overwrite."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_rlrt.config import ConfigError, parse_config
from megatron_rlrt.trainer import run_dir
from tests.conftest import run_cli, tiny_train_args


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("what", ["latest_deleted", "only_metrics"])
def test_rerun_into_a_used_save_changes_not_one_byte(trained_run, tiny_model, arithmetic_data, tmp_path, what):
    run = _copy(trained_run, tmp_path)
    if what == "latest_deleted":
        (run / "checkpoints" / "latest").unlink()
    else:  # a run killed before its first checkpoint
        shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    r = run_cli(*tiny_train_args(tiny_model, arithmetic_data, run, 2))
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"--save {run} holds a previous run" in errors[0] and "--overwrite" in errors[0]
    assert str(run / "metrics.jsonl") in errors[0]
    assert _snapshot(run) == before


def test_no_auto_resume_keeps_the_old_run_and_writes_beside_it(trained_run, tiny_model, arithmetic_data, tmp_path):
    run = _copy(trained_run, tmp_path)
    before = _snapshot(run)
    r = run_cli(*tiny_train_args(tiny_model, arithmetic_data, run, 1), "--no-auto-resume")
    assert r.returncode == 0, r.stderr[-3000:]
    new = run / "restart-1"
    assert f"this run writes to {new}" in r.stdout
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith("restart-1/")} == before
    rows = [json.loads(line) for line in (new / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1]
    assert (new / "checkpoints" / "latest").read_text() == "iter_0000001"


def test_overwrite_deletes_the_previous_run(trained_run, tmp_path, tiny_model, arithmetic_data):
    run = _copy(trained_run, tmp_path)
    (run / "notes.txt").write_text("mine")  # not a run artifact: kept
    cfg = parse_config(tiny_train_args(tiny_model, arithmetic_data, run, 2) + ["--overwrite"])
    logs = []
    assert run_dir.prepare(cfg, log=logs.append) is None  # start from step 0
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    assert (run / "notes.txt").read_text() == "mine"
    assert "--overwrite: deleting the previous run" in logs[0]


def test_resume_and_fresh_decisions(trained_run, tmp_path, tiny_model, arithmetic_data):
    cfg = parse_config(tiny_train_args(tiny_model, arithmetic_data, trained_run, 3))
    cfg.validate()  # a used --save with a latest checkpoint: resumed, not refused
    assert run_dir.prepare(cfg, log=lambda m: None).endswith("iter_0000002")
    fresh = parse_config(tiny_train_args(tiny_model, arithmetic_data, tmp_path / "new", 3))
    assert run_dir.prepare(fresh) is None and fresh.save == str(tmp_path / "new")
    run = _copy(trained_run, tmp_path)
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(ConfigError, match="holds a previous run") as err:
        parse_config(tiny_train_args(tiny_model, arithmetic_data, run, 3)).validate()
    assert "\n" not in str(err.value)
