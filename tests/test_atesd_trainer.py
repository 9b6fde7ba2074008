"""ATESD through the trainer (2 ranks, gloo): exposure metrics, the fixed-exposure sweep's
mismatch, and a resumed run that continues the controller exactly."""

import json

import pytest

from megatron_rlrt import parallel
from tests.test_trainer_e2e import _base
from tests.helpers.trainer_helpers import interrupted_rank, methods_rank, train_rank


def _metrics(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_fixed_exposure_is_logged_with_the_mismatch(tiny_model, arithmetic_data, tmp_path):
    """The sweep's two ends on OPSD: rho and teacher/mismatch are logged each step; the views
    at rho = 0 carry no solution tokens, so their teacher prompts are shorter."""
    results = {}
    for rho in ("0", "1"):
        out = tmp_path / f"rho{rho}.json"
        argv = _base(tiny_model, arithmetic_data) + ["--tensor-model-parallel-size", "2",
                                                     "--teacher-exposure", f"fixed:{rho}"]
        parallel.spawn(methods_rank, 2, argv, ["opsd"], str(out))
        results[rho] = json.loads(out.read_text())["opsd"]["metrics"]
    for rho, steps in results.items():
        for m in steps:
            assert m["atesd/rho"] == float(rho) and m["rlrt/teacher_built"] > 0
            assert "teacher/mismatch" in m and m["teacher/mismatch"] == m["teacher/mismatch"]  # finite, not nan
    # same seed, same rollouts at step 1: only the teacher prompts differ
    assert results["0"][0]["reward/mean"] == results["1"][0]["reward/mean"]
    assert results["0"][0]["perf/batch_tokens"] < results["1"][0]["perf/batch_tokens"]


def test_atesd_resumes_its_controller_exactly(tiny_model, arithmetic_data, tmp_path):
    base = _base(tiny_model, arithmetic_data) + ["--tensor-model-parallel-size", "2", "--advantage-estimator", "atesd",
                                                 "--atesd-hold-window", "1", "--atesd-horizon", "1", "--atesd-lr", "0.5",
                                                 "--save-interval", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    parallel.spawn(train_rank, 2, base + ["--train-iters", "4", "--save", str(straight)])
    # the same run stopped right after its step-2 checkpoint (same --train-iters: the controller
    # reads the step fraction), then restarted
    parallel.spawn(interrupted_rank, 2, base + ["--train-iters", "4", "--save", str(resumed)], 2)
    parallel.spawn(train_rank, 2, base + ["--train-iters", "4", "--save", str(resumed)])
    a, b = _metrics(straight), _metrics(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):  # a new rho every step (H = 1), each from the controller's Beta policy
        assert 0 <= a[step]["atesd/rho"] <= 1 and a[step]["atesd/beta_a"] > 1 and a[step]["atesd/beta_b"] > 1
    assert "atesd/reward" in a[4]  # decisions were scored and the policy updated
    state = json.loads((straight / "checkpoints" / "iter_0000004" / "trainer_state.json").read_text())
    assert state["exposure"]["rule"]["controller"]["decisions"] == 4
    for step in (3, 4):
        for key, value in a[step].items():
            if key.startswith("atesd/") or key in ("teacher/mismatch", "loss/distill", "reward/mean"):
                assert b[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
