"""examples/quickstart_cpu.sh keeps its held-out prompts out of every training step.

The script is run in its dry-run mode: it builds the data set for real (reasoning-gym, seconds)
and prints the warm-up SFT and trainer commands it would run. Every file those commands train
on (``--data`` of tools/warmup_sft.py, ``--prompt-data`` of the trainer) is read back and
compared with ``--eval-data``, by prompt text and by the reasoning-gym question.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "quickstart_cpu.sh")
TRAINING_FLAGS = {"tools/warmup_sft.py": ("--data",), "examples/train_rlrt_qwen3.sh": ("--prompt-data",)}


def _flag_values(argv: list[str], flag: str) -> list[str]:
    """Values of a repeatable flag, as ``--flag V`` or ``--flag=V``."""
    out = []
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith(flag + "="):
            out.append(arg.split("=", 1)[1])
    return out


def training_and_eval_files(commands: list[list[str]]) -> tuple[dict[str, list[str]], list[str]]:
    """({stage: files it trains on}, held-out files) from the stage commands of a dry run."""
    train, held_out = {}, []
    for argv in commands:
        for stage, flags in TRAINING_FLAGS.items():
            if stage in argv:
                train[stage] = [v for f in flags for v in _flag_values(argv, f)]
                held_out += _flag_values(argv, "--eval-data")
    return train, held_out


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _questions(rows: list[dict]) -> set[str]:
    """The prompt text and, for reasoning-gym rows, the task's own question."""
    keys = set()
    for r in rows:
        keys.add(" ".join(r["prompt"].split()))
        entry = (r.get("metadata") or {}).get("reasoning_gym", {}).get("entry") or {}
        if entry.get("question"):
            keys.add(" ".join(entry["question"].split()))
    return keys


def overlap(train: dict[str, list[str]], held_out: list[str]) -> dict[str, set[str]]:
    """{stage: held-out questions it trains on}; empty sets when the held-out set is held out."""
    held = set().union(*(_questions(_rows(p)) for p in held_out))
    return {stage: held & set().union(*(_questions(_rows(p)) for p in files)) for stage, files in train.items()}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    env = dict(os.environ, OUT=str(out), QUICKSTART_DRY_RUN="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("[quickstart]")
                and any(stage in line for stage in TRAINING_FLAGS)]
    return out, commands


def test_quickstart_trains_on_no_held_out_prompt(dry_run):
    out, commands = dry_run
    train, held_out = training_and_eval_files(commands)
    assert set(train) == set(TRAINING_FLAGS), f"stages found in the dry run: {sorted(train)}"
    assert all(train.values()) and held_out, (train, held_out)
    for files in list(train.values()) + [held_out]:
        for path in files:
            assert os.path.realpath(path).startswith(os.path.realpath(str(out))), path
            assert _rows(path), f"{path} is empty"
    assert not set(map(os.path.realpath, held_out)) & {os.path.realpath(p) for f in train.values() for p in f}
    assert overlap(train, held_out) == {stage: set() for stage in TRAINING_FLAGS}
    # the held-out set is big enough to measure something (see README: 47 prompts)
    assert len(_rows(held_out[0])) >= 40


def test_overlap_check_catches_a_warm_up_on_the_held_out_file(dry_run):
    """The check itself: the quickstart's earlier warm-up (train + eval files) is flagged."""
    _, commands = dry_run
    train, held_out = training_and_eval_files(commands)
    leaky = dict(train, **{"tools/warmup_sft.py": train["tools/warmup_sft.py"] + held_out})
    found = overlap(leaky, held_out)
    assert found["tools/warmup_sft.py"] == _questions(_rows(held_out[0]))
    assert found["examples/train_rlrt_qwen3.sh"] == set()
