"""End-to-end RL steps on megatron-core (2 ranks, gloo): every method at TP=2 and at PP=2."""

import json
import math

import pytest

from megatron_rlrt import parallel
from megatron_rlrt.algorithms import METHODS as REGISTRY
from tests.helpers.trainer_helpers import methods_rank

pytestmark = pytest.mark.slow  # spawns ranks or servers: `-m "not slow"` skips it

# every registered method (read at collection, before any test registers a plug-in)
METHODS = sorted(REGISTRY)


def _base(model, data):
    return ["--hf-checkpoint", model, "--prompt-data", data, "--reward", "hash_parity", "--rollout-batch-size", "2",
            "--n-samples-per-prompt", "4", "--rollout-max-response-len", "6", "--train-iters", "2", "--lr", "1e-3",
            "--lr-warmup-iters", "0", "--global-batch-size", "4", "--no-progress", "--no-tensorboard",
            "--enable-thinking", "--teacher-max-prompt-len", "512", "--distill-topk", "8"]


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_every_method_trains(tiny_model, arithmetic_data, tmp_path, layout):
    out = tmp_path / "methods.json"
    parallel.spawn(methods_rank, 2, _base(tiny_model, arithmetic_data) + layout, METHODS, str(out))
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(METHODS)
    for method, r in results.items():
        assert r["finite_params"], method
        spec = REGISTRY[method]
        for m in r["metrics"]:
            assert m["actor/grad_norm"] > 0, f"{method}: no gradient reached the parameters"
            assert m["perf/step_time_s"] > 0 and math.isfinite(m["reward/mean"])
            if spec.model_reward is None:  # verifier rewards are in {0, 1}; a model's (RLT) are log-probs
                assert 0 <= m["reward/mean"] <= 1
        last = r["metrics"][-1]
        if spec.model_reward is not None:  # the frozen model's reward terms were computed and logged
            assert all(math.isfinite(v) for name, v in last.items() if name.startswith(f"{method}/")), method
            assert any(name.startswith(f"{method}/") for name in last), method
        if spec.token_weight is not None:
            assert last["rlrt/teacher_built"] > 0, f"{method}: no teacher views were built"
            assert "rlrt/weight_mean" in last
        if spec.uses_distillation:
            assert "loss/distill" in last, method
        if not spec.needs_teacher:
            assert "rlrt/teacher_built" not in last
        else:  # the teacher exposure (ATESD) is logged for every teacher method: full unless chosen
            assert 0 <= last["atesd/rho"] <= 1 and (spec.exposure != "fixed:1" or last["atesd/rho"] == 1.0)
            assert "teacher/mismatch" in last or last["rlrt/teacher_built"] == 0, method


@pytest.mark.parametrize("weights", ["initial", "ema"])
def test_separate_teacher_weights(tiny_model, arithmetic_data, tmp_path, weights):
    """RLRT and a top-K distillation baseline with a teacher other than the current policy."""
    out = tmp_path / "teacher.json"
    argv = _base(tiny_model, arithmetic_data) + ["--tensor-model-parallel-size", "2", "--teacher-weights", weights]
    parallel.spawn(methods_rank, 2, argv, ["rlrt", "sdpo"], str(out))
    results = json.loads(out.read_text())
    steps = results["rlrt"]["metrics"]
    assert all(m["actor/grad_norm"] > 0 for m in steps)
    assert steps[-1]["rlrt/teacher_built"] > 0 and "rlrt/weight_mean" in steps[-1]
    steps = results["sdpo"]["metrics"]
    assert all(m["actor/grad_norm"] > 0 for m in steps)
    assert all(math.isfinite(m["loss/distill"]) for m in steps)


def test_data_parallel_with_distributed_optimizer_trains_saves_and_resumes(tiny_model, arithmetic_data, tmp_path):
    """DP=2 (samples split across replicas by tokens), ZeRO-1 optimizer, checkpoint + resume."""
    from tests.helpers.trainer_helpers import train_rank

    run = tmp_path / "run"
    argv = _base(tiny_model, arithmetic_data) + ["--use-distributed-optimizer", "--advantage-estimator", "rlrt",
                                                 "--save", str(run)]
    parallel.spawn(train_rank, 2, argv)
    parallel.spawn(train_rank, 2, argv + ["--train-iters", "3"])  # the last flag wins
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["actor/grad_norm"] > 0 for r in rows)
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000003"
