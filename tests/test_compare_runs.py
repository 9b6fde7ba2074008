"""tools/compare_runs.py on synthetic run directories whose numbers are computed by hand."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import compare_runs as C  # noqa: E402

from megatron_rlrt.data import strategy_task as task  # noqa: E402


def _text(strategy, terms=(1, 2, 3)):
    return task.render(strategy, terms)


def _write_run(root, name, rewards, entropy, d_mean=None, eval_problems=None, n=4):
    run = root / name
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for step, r in enumerate(rewards, 1):
            row = {"step": step, "reward/mean": r, "actor/entropy": entropy[step - 1], "response/length_mean": 40.0 + step}
            if d_mean is not None:
                row["rlrt/d_mean"] = d_mean[step - 1]
            f.write(json.dumps(row) + "\n")
    if eval_problems is not None:
        _write_eval(run / "eval", name, eval_problems, n)
    return str(run)


def _write_eval(directory, label, problems, n):
    """problems: list of (id, [(strategy, correct), ...]) as evaluate.py writes them."""
    from megatron_rlrt.eval.metrics import pass_at_k

    (directory / label).mkdir(parents=True)
    records = []
    for pid, samples in problems:
        records.append({"id": pid, "n": n, "n_correct": sum(ok for _, ok in samples), "correct": [ok for _, ok in samples],
                        "responses": [_text(s) for s, _ in samples], "response_lengths": [40] * n})
    with open(directory / label / "heldout.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    counts = [r["n_correct"] for r in records]
    summary = {"problems": len(records), "n": n, f"avg@{n}": sum(counts) / (n * len(records)),
               "pass@k": {str(k): sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in range(1, n + 1)}}
    with open(directory / "summary.json", "w") as f:
        json.dump({"heldout": {label: summary}}, f)


@pytest.fixture
def study(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    L, R, F = "left", "right", "first_two"
    paths = [
        # grpo seed 1: a has 2/4 correct (left, right), b 2/4 (left, left)
        _write_run(runs, "grpo-s1", [0.2, 0.4, 0.6, 0.8], [1.0, 0.9, 0.8, 0.7],
                   eval_problems=[("p:0", [(L, True), (R, True), (F, False), (F, False)]),
                                  ("p:1", [(L, True), (L, True), (F, False), (F, False)])]),
        # grpo seed 2: a 4/4 (all left), b 0/4
        _write_run(runs, "grpo-s2", [0.1, 0.3, 0.5, 0.5], [1.0, 1.0, 0.6, 0.4],
                   eval_problems=[("p:0", [(L, True)] * 4), ("p:1", [(F, False)] * 4)]),
        _write_run(runs, "rlrt-s1", [0.3, 0.3, 0.9, 0.9], [1.0, 1.0, 1.0, 1.0], d_mean=[0.5, 0.4, 0.3, 0.1]),
    ]
    return tmp_path, paths


def _args(paths, out, *extra):
    return C.build_parser().parse_args([*paths, "--output-dir", str(out), "--last", "2", *extra])


def test_numbers_over_seeds_match_hand_computation(study):
    root, paths = study
    out = root / "report"
    C.compare(_args(paths, out))
    summary = json.load(open(out / "summary.json"))
    grpo, rlrt = summary["methods"]["grpo"], summary["methods"]["rlrt"]
    # train reward: mean of the last 2 steps -> s1 (0.6 + 0.8) / 2 = 0.7, s2 (0.5 + 0.5) / 2 = 0.5
    assert grpo["train reward"] == pytest.approx({"mean": 0.6, "min": 0.5, "max": 0.7})
    # entropy: s1 0.75, s2 0.5
    assert grpo["entropy"] == pytest.approx({"mean": 0.625, "min": 0.5, "max": 0.75})
    assert grpo["rlrt/d_mean"] is None  # GRPO logs no D_t
    assert rlrt["rlrt/d_mean"] == pytest.approx({"mean": 0.2, "min": 0.2, "max": 0.2})
    assert grpo["seeds"] == ["1", "2"] and rlrt["seeds"] == ["1"]
    # held-out avg@4: s1 4/8 = 0.5, s2 4/8 = 0.5; pass@4: s1 1.0, s2 0.5
    assert grpo["avg@n"] == pytest.approx({"mean": 0.5, "min": 0.5, "max": 0.5})
    assert grpo["pass@4"] == pytest.approx({"mean": 0.75, "min": 0.5, "max": 1.0})
    # strategies among correct answers: s1 left 3/4, right 1/4 -> H = -(.75 ln .75 + .25 ln .25); s2 all left -> 0
    h1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert grpo["strategy_entropy"] == pytest.approx({"mean": h1 / 2, "min": 0.0, "max": h1})
    run1 = summary["runs"][paths[0]]
    assert run1["strategies"]["shares"] == pytest.approx({"left": 0.75, "right": 0.25})


def test_paired_differences_against_the_reference_by_hand(study):
    root, paths = study
    out = root / "report"
    text = C.compare(_args(paths, out))
    paired = json.load(open(out / "summary.json"))["paired_vs_reference"]
    assert paired["reference"] == "grpo" and set(paired) == {"reference", "rlrt"}
    rlrt = paired["rlrt"]
    # only seed 1 is shared: all-steps reward 0.6 - 0.5, last-2 reward 0.9 - 0.7; rlrt has no evaluation
    assert rlrt["seeds"] == 1
    assert rlrt["reward, all steps"] == pytest.approx({"mean": 0.1, "min": 0.1, "max": 0.1, "positive": 1, "n": 1})
    assert rlrt["train reward (last)"] == pytest.approx({"mean": 0.2, "min": 0.2, "max": 0.2, "positive": 1, "n": 1})
    assert "held-out avg@n" not in rlrt
    section = text[text.index("paired by seed"):]
    row = next(line for line in section.splitlines() if line.startswith("| rlrt | 1 |"))
    assert "+0.100 [+0.100, +0.100] (1/1)" in row and row.endswith("(1/1) | - |")
    # against a method that has no runs: no table
    text = C.compare(_args(paths, root / "r2", "--reference", "none"))
    assert "paired by seed" not in text


def test_passk_confidence_interval_by_hand(study):
    root, paths = study
    runs = [C.load_run(p, C.re.compile(r"^(?P<group>.+)-s(?P<seed>\d+)$"), "eval", None) for p in paths[:2]]
    ci = C.passk_with_ci(runs)
    # pass@1 per problem averaged over seeds: p0 (0.5 + 1) / 2 = 0.75, p1 (0.5 + 0) / 2 = 0.25
    mean, sd = 0.5, math.sqrt(2 * 0.25**2)
    half = 1.96 * sd / math.sqrt(2)
    assert ci[1] == pytest.approx((mean, mean - half, mean + half))
    # pass@2 with n = 4, c = 2: 1 - C(2,2)/C(4,2) = 5/6; c = 4: 1; c = 0: 0 -> p0 (5/6 + 1)/2, p1 (5/6)/2
    p0, p1 = (5 / 6 + 1) / 2, (5 / 6) / 2
    m2 = (p0 + p1) / 2
    half2 = 1.96 * math.sqrt((p0 - m2) ** 2 + (p1 - m2) ** 2) / math.sqrt(2)
    assert ci[2] == pytest.approx((m2, max(0, m2 - half2), min(1, m2 + half2)))
    assert sorted(ci) == [1, 2, 3, 4]


def test_report_table_and_figures(study):
    root, paths = study
    out = root / "report"
    text = C.compare(_args(paths, out, "--baseline-eval", os.path.join(paths[0], "eval")))
    table = (out / "report.md").read_text()
    assert text.startswith(table)
    grpo_row = next(line for line in table.splitlines() if line.startswith("| grpo |"))
    # reward over all steps (s1 0.5, s2 0.35), then over the last 2 (s1 0.7, s2 0.5)
    assert "| 2 | 4 | 0.425 [0.350, 0.500] | 0.600 [0.500, 0.700] |" in grpo_row
    assert "0.750 [0.500, 1.000]" in grpo_row  # pass@4
    assert any(line.startswith("| step 0 (warm-up) |") for line in table.splitlines())
    rlrt_row = next(line for line in table.splitlines() if line.startswith("| rlrt |"))
    assert "| 1 | 4 | 0.600 | 0.900 |" in rlrt_row  # one seed: no range
    assert "Strategy shares" in table
    for png in ("training.png", "passk.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("no_metrics", "no metrics.jsonl"),
    ("bad_json", "metrics.jsonl, row 2: invalid JSON"),
    ("no_reward", "no step has reward/mean"),
    ("two_benchmarks", "choose one with --benchmark"),
])
def test_bad_run_dirs_are_one_clear_error(tmp_path, capsys, case, message):
    run = tmp_path / "m-s1"
    if case != "missing":
        run.mkdir()
    if case == "bad_json":
        (run / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward\n')
    elif case == "no_reward":
        (run / "metrics.jsonl").write_text('{"step": 1, "actor/entropy": 0.5}\n')
    elif case == "two_benchmarks":
        (run / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n')
        (run / "eval").mkdir()
        (run / "eval" / "summary.json").write_text(json.dumps({"a": {"x": {}}, "b": {"x": {}}}))
    code = C.main([str(run), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and str(run) in err
