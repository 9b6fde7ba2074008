"""tools/evaluate.py and the pass@k estimator: closed form and brute-force enumeration; an
end-to-end run (per-problem records, summary, plot) that resumes after an interruption to the
same results; a megatron checkpoint saved at TP=2; clear errors."""

from __future__ import annotations

import itertools
import json
import math
import os
import zlib

import pytest

from megatron_rlrt.analysis.stats import pass_at_k_curve
from megatron_rlrt.eval.metrics import pass_at_k


def _brute_force(n, c, k):
    """P(some of k draws without replacement is correct), by enumerating every k-subset."""
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_and_stable_product():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)
    # K = 256 as in the paper's Fig. 8: Chen et al.'s numerically stable product form
    for c in (0, 1, 3, 40, 255, 256):
        for k in (1, 2, 16, 100, 256):
            stable = 1.0 if 256 - c < k else 1.0 - math.prod(1.0 - k / j for j in range(256 - c + 1, 257))
            assert pass_at_k(256, c, k) == pytest.approx(stable, abs=1e-9)
    curve = pass_at_k_curve([0, 2, 4], 4, [1, 2, 4])
    assert curve[1] == pytest.approx((0 + 0.5 + 1) / 3) and curve[4] == pytest.approx(2 / 3)


def _run(argv):
    from tests.helpers.trainer_helpers import register_test_rewards
    from tools.evaluate import main

    register_test_rewards()
    return main(argv)


def _args(ckpts, data, out, *extra):
    argv = []
    for c in ckpts:
        argv += ["--checkpoint", c]
    return argv + ["--data", data, "--output-dir", out, "--n-samples", "4", "--max-new-tokens", "4",
                   "--max-problems", "6", "--batch-problems", "2", "--reward", "hash_parity", "--no-progress",
                   *extra]


def test_evaluate_end_to_end_resume_and_megatron_checkpoint(tiny_model, arithmetic_data, tmp_path, capsys):
    from megatron_rlrt.convert import hf_to_megatron

    out = str(tmp_path / "ev")
    assert _run(_args([f"base={tiny_model}"], arithmetic_data, out)) == 0
    path = os.path.join(out, "base", "train.jsonl")
    records = [json.loads(line) for line in open(path)]
    assert len(records) == 6 and all(r["n"] == 4 and len(r["responses"]) == 4 for r in records)
    for r in records:  # the verifier's verdicts, recomputed independently
        assert r["correct"] == [zlib.crc32(t.encode()) % 2 == 0 for t in r["responses"]]
        assert r["n_correct"] == sum(r["correct"])
    summary = json.load(open(os.path.join(out, "summary.json")))["train"]["base"]
    outcomes = [r["correct"] for r in records]
    assert summary["avg@4"] == pytest.approx(sum(map(sum, outcomes)) / 24)
    for k in (1, 2, 3, 4):
        brute = sum(_brute_force(4, sum(o), k) for o in outcomes) / 6
        assert summary["pass@k"][str(k)] == pytest.approx(brute)
    assert 0 < summary["avg@4"] < 1  # mixed outcomes: the estimator does real work
    assert os.path.getsize(os.path.join(out, "passk.png")) > 1000
    assert "| train | base | 6 |" in open(os.path.join(out, "summary.md")).read()

    # interrupted run: two complete problems and a torn third line; the rerun completes the file
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records[:2]) + json.dumps(records[2])[:50])
    capsys.readouterr()
    assert _run(_args([f"base={tiny_model}"], arithmetic_data, out)) == 0
    assert "resuming, 2 of 6 problems done" in capsys.readouterr().out
    assert [json.loads(line) for line in open(path)] == records  # same seeds per batch: same samples

    # a megatron checkpoint saved at TP=2 evaluates to the same samples (exported once for the engine)
    mcore = str(tmp_path / "mcore")
    hf_to_megatron(tiny_model, mcore, tp=2)
    assert _run(_args([f"base={tiny_model}", f"mcore={mcore}"], arithmetic_data, out)) == 0
    again = [json.loads(line) for line in open(os.path.join(out, "mcore", "train.jsonl"))]
    assert [r["response_ids"] for r in again] == [r["response_ids"] for r in records]
    assert set(json.load(open(os.path.join(out, "summary.json")))["train"]) == {"base", "mcore"}


def test_evaluate_errors(tiny_model, arithmetic_data, tmp_path, capsys):
    out = str(tmp_path / "ev")
    assert _run(_args([tiny_model], str(tmp_path / "missing.jsonl"), out)) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert _run(_args([str(tmp_path)], arithmetic_data, out)) == 2
    assert "neither a Hugging Face directory" in capsys.readouterr().err
    os.makedirs(os.path.join(out, "tiny"), exist_ok=True)
    with open(os.path.join(out, "tiny", "train.jsonl"), "w") as f:
        f.write('{"id": "train.jsonl:1", "correct": [true], "n": 4}\nnot json\n{"id": "x", "correct": []}\n')
    assert _run(_args([f"tiny={tiny_model}"], arithmetic_data, out)) == 2
    assert "train.jsonl:2: not a valid per-problem record" in capsys.readouterr().err
    assert _run(_args([f"tiny={tiny_model}"], arithmetic_data, out, "--temperature", "0.5")) == 2
    assert "other settings" in capsys.readouterr().err
