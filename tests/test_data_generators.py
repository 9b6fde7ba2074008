"""Offline generators and the make_dataset CLI."""

import importlib.util
import json
import os
import sys
import zipfile

import pytest
import reasoning_gym

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_rlrt.data import generators as gen  # noqa: E402
from tools import make_dataset  # noqa: E402

CHAMP = {
    "problems": {
        "P_1": {
            "identifier": "P_1",
            "_text": "How many?",
            "_answer": "239",
            "category": "Combinatorics",
            "solution": {"steps": [{"_text": "Step one."}, {"_text": "So 239."}]},
        },
        "P_2": {"identifier": "P_2", "_text": "Is it?", "_answer": "No, never", "category": "Sequence", "solution": {"steps": []}},
        "P_3": {"identifier": "P_3", "_text": "Find f.", "_answer": "2^(n-1)", "category": "Sequence", "solution": {"steps": []}},
    }
}

AIME = [
    {"input": [{"role": "system", "content": "three digits"}, {"role": "user", "content": "Find m+n."}], "ideal": "079"},
]


def test_reasoning_gym_rows_carry_what_scoring_needs():
    rows = list(gen.reasoning_gym_rows("chain_sum", size=4, seed=9, config={"min_terms": 2, "max_terms": 2}, instruction="Use <answer>."))
    ds = reasoning_gym.create_dataset("chain_sum", size=4, seed=9, min_terms=2, max_terms=2)
    for i, row in enumerate(rows):
        assert row["prompt"] == ds[i]["question"] + "\n\nUse <answer>."
        assert row["answer"] == ds[i]["answer"] and row["verifier"] == "reasoning_gym"
        meta = row["metadata"]["reasoning_gym"]
        assert (meta["task"], meta["seed"], meta["size"], meta["index"]) == ("chain_sum", 9, 4, i)
        json.dumps(row)  # JSON-safe


def test_champ_rows_from_json_and_filters(tmp_path):
    path = tmp_path / "v0.json"
    path.write_text(json.dumps(CHAMP))
    rows = list(gen.champ_rows(str(path), answers="all"))
    assert [r["answer"] for r in rows] == ["239", "No, never", "2^(n-1)"]
    assert rows[0]["solution"] == "Step one.\nSo 239." and rows[0]["verifier"] == "math"
    assert [r["answer"] for r in gen.champ_rows(str(path), answers="no_text")] == ["239", "2^(n-1)"]
    assert [r["answer"] for r in gen.champ_rows(str(path), answers="numeric")] == ["239"]


@pytest.mark.skipif(importlib.util.find_spec("champ_dataset") is None, reason="champ-dataset not installed")
def test_champ_rows_from_installed_package():
    rows = list(gen.champ_rows(answers="all"))
    assert len(rows) == 270 and all(r["solution"] for r in rows)


def test_aime_rows_from_wheel_and_jsonl(tmp_path):
    text = "".join(json.dumps(s) + "\n" for s in AIME)
    wheel = tmp_path / "evals-3.0.1.post1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(gen.EVALS_AIME, text)
    plain = tmp_path / "samples.jsonl"
    plain.write_text(text)
    for source in (wheel, plain):
        (row,) = gen.aime_rows(str(source), keep_system=False, instruction="Box it.")
        assert row["prompt"] == [{"role": "user", "content": "Find m+n.\n\nBox it."}]
        assert row["answer"] == "079" and row["verifier"] == "math"


def test_jsonable():
    assert gen.jsonable({"a": (1, {2, 1}), 3: None}) == {"a": [1, [1, 2]], "3": None}


def test_cli_help_for_every_command(capsys):
    for argv in (["--help"], ["reasoning-gym", "--help"], ["champ", "--help"], ["aime", "--help"], ["check", "--help"], ["list-tasks", "--help"]):
        with pytest.raises(SystemExit) as e:
            make_dataset.main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--eval-size" in out and "--answer-key" in out and "--no-system" in out


def test_cli_reasoning_gym_with_held_out_split(tmp_path):
    out, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    make_dataset.main([
        "reasoning-gym", "--task", "basic_arithmetic", "--size", "20", "--seed", "1",
        "--config", '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}',
        "--out", str(out), "--eval-size", "20", "--eval-out", str(held),
    ])
    train = [json.loads(x) for x in out.read_text().splitlines()]
    evals = [json.loads(x) for x in held.read_text().splitlines()]
    assert len(train) == 20 and 0 < len(evals) <= 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}


def test_cli_bad_input_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="error: .*not registered"):
        make_dataset.main(["reasoning-gym", "--task", "no_such_task", "--size", "1", "--out", str(tmp_path / "x.jsonl")])
    with pytest.raises(SystemExit, match="error: .*unknown dataset format"):
        make_dataset.main(["check", str(tmp_path / "x.csv")])
