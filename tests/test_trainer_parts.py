"""Trainer properties checked against independent computations (2 ranks, gloo)."""

import json

import pytest

from megatron_rlrt import parallel
from tests.test_trainer_e2e import _base
from tests.helpers.trainer_helpers import assert_resumed_steps_equal, teacher_logprobs_rank, weight_sync_rank

pytestmark = pytest.mark.slow  # spawns ranks or servers: `-m "not slow"` skips it


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_engine_logits_equal_trainer_logits_after_sync(tiny_models, arithmetic_data, tmp_path, layout):
    out = tmp_path / "sync.json"
    argv = _base(tiny_models["untied"], arithmetic_data) + layout + ["--advantage-estimator", "grpo", "--train-iters", "1"]
    parallel.spawn(weight_sync_rank, 2, argv, str(out))
    r = json.loads(out.read_text())
    assert r["engine_changed"] > 1e-4, "the update did not reach the engine"
    assert r["max_abs_diff"] < 1e-4, r
    assert r["version"] == 1


def test_teacher_logprobs_from_packed_forward_equal_a_teacher_only_forward(tiny_model, arithmetic_data, tmp_path):
    out = tmp_path / "teacher.json"
    argv = _base(tiny_model, arithmetic_data) + ["--tensor-model-parallel-size", "2", "--advantage-estimator", "rlrt_all"]
    parallel.spawn(teacher_logprobs_rank, 2, argv, str(out))
    r = json.loads(out.read_text())
    assert r["teachers"] == r["with_teacher"] > 0
    assert r["max_abs_diff"] < 1e-5, r
    assert r["student_teacher_differ"] > 1e-3, "teacher context had no effect: the test would prove nothing"


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_frozen_teacher_for_top_k_distillation(tiny_model, arithmetic_data, tmp_path, layout):
    from tests.helpers.trainer_helpers import frozen_teacher_rank

    out = tmp_path / "frozen.json"
    argv = _base(tiny_model, arithmetic_data) + layout + ["--advantage-estimator", "sdpo", "--teacher-weights",
                                                          "initial"]
    parallel.spawn(frozen_teacher_rank, 2, argv, str(out))
    r = json.loads(out.read_text())
    assert r["teachers"] > 0 and r["keys_equal"] and r["ids_equal"], r
    assert r["topk_vs_packed"] < 1e-5 and r["lp_vs_packed"] < 1e-5, r  # same weights, separate pass
    assert r["current_moved"] > 1e-4, "the update did not move the policy: the test would prove nothing"
    assert r["later_lp_vs_start"] < 1e-6, r  # the teacher stayed the starting weights


def _metrics(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_resumed_run_matches_uninterrupted_run(tiny_model, arithmetic_data, tmp_path):
    from tests.helpers.trainer_helpers import train_rank

    base = _base(tiny_model, arithmetic_data) + ["--tensor-model-parallel-size", "2", "--advantage-estimator", "rlrt",
                                                 "--save-interval", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    parallel.spawn(train_rank, 2, base + ["--train-iters", "4", "--save", str(straight)])
    parallel.spawn(train_rank, 2, base + ["--train-iters", "2", "--save", str(resumed)])
    # a save killed half-way leaves a hidden temp dir; resume must ignore it and a later save remove it
    junk = resumed / "checkpoints" / ".iter_0000003.incomplete"
    junk.mkdir()
    (junk / "partial.distcp").write_text("torn write")
    parallel.spawn(train_rank, 2, base + ["--train-iters", "4", "--save", str(resumed)])
    a, b = _metrics(straight), _metrics(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    compared = assert_resumed_steps_equal(a, b)
    assert compared > 20
    assert a[3]["actor/grad_norm"] > 0
    assert not junk.exists()
    assert (resumed / "checkpoints" / "latest").read_text() == "iter_0000004"


def test_rollout_failure_stops_every_rank_and_keeps_the_last_checkpoint(tiny_model, arithmetic_data, tmp_path):
    from tests.helpers.trainer_helpers import failing_train_rank

    run = tmp_path / "run"
    argv = _base(tiny_model, arithmetic_data) + ["--tensor-model-parallel-size", "2", "--advantage-estimator", "grpo",
                                                 "--train-iters", "3", "--save-interval", "1", "--save", str(run)]
    out = tmp_path / "failure"
    # the engine's 1st generate call is step 1, the 2nd is step 2: it dies there
    parallel.spawn(failing_train_rank, 2, argv, 2, str(out))
    errors = [json.loads((tmp_path / f"failure.{r}").read_text())["error"] for r in range(2)]
    assert "engine died (test)" in errors[0]
    assert errors[1] and "rank 0 failed while making the rollout batch of step 2" in errors[1]
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000001"
    assert sorted(_metrics(run)) == [1]
    # the surviving checkpoint is complete: a new run resumes from it and finishes
    from tests.helpers.trainer_helpers import train_rank

    parallel.spawn(train_rank, 2, argv)
    assert sorted(_metrics(run)) == [1, 2, 3]


@pytest.mark.parametrize("teacher", ["current", "initial"])
def test_reference_kl_uses_the_starting_weights(tiny_model, arithmetic_data, tmp_path, teacher):
    """With --teacher-weights initial, teacher and reference rows share one swapped-in pass."""
    from tests.helpers.trainer_helpers import reference_rank

    out = tmp_path / "ref.json"
    argv = _base(tiny_model, arithmetic_data) + ["--tensor-model-parallel-size", "2", "--advantage-estimator", "rlrt",
                                                 "--kl-coef", "0.5", "--kl-type", "k3", "--teacher-weights", teacher,
                                                 "--global-batch-size", "8"]  # one update per step: on-policy
    parallel.spawn(reference_rank, 2, argv, str(out))
    r = json.loads(out.read_text())
    assert r["trained_vs_start"] > 1e-4, "training did not move the policy: the test would prove nothing"
    assert r["ref_vs_expected"] < 1e-5, r  # the reference is the starting model
    assert r["back_vs_trained"] == 0.0, r  # and swapping it out restores the policy exactly
    first, second = r["steps"]
    assert abs(first["actor/ref_kl"]) < 1e-9, "policy == reference during the first update: KL must be 0"
    assert second["actor/ref_kl"] > 1e-7, "after an update the k3 estimate of KL(pi || ref) is positive"
    assert second["rlrt/teacher_built"] > 0 and "rlrt/weight_mean" in second


@pytest.mark.parametrize("kind", ["hf", "megatron_tp2"])
def test_ref_load_is_the_reference_policy(tiny_model, arithmetic_data, tmp_path, kind):
    """--ref-load: another model of the same architecture (a HF directory, or that model converted
    at another TP) is the KL reference; its logits equal transformers' for that model."""
    from megatron_rlrt.convert import hf_to_megatron
    from tests.conftest import TINY_CONFIGS
    from tests.helpers.trainer_helpers import reference_rank
    from tools.make_tiny_qwen3 import make_tiny_qwen3

    ref_hf = make_tiny_qwen3(str(tmp_path / "ref_hf"), seed=99, **TINY_CONFIGS["tied"])
    ref_load = ref_hf
    if kind == "megatron_tp2":
        ref_load = str(tmp_path / "ref_megatron")
        hf_to_megatron(ref_hf, ref_load, tp=2)
    out = tmp_path / "ref.json"
    argv = _base(tiny_model, arithmetic_data) + ["--advantage-estimator", "grpo", "--kl-coef", "0.5",
                                                 "--ref-load", ref_load, "--global-batch-size", "8",
                                                 "--train-iters", "1"]
    parallel.spawn(reference_rank, 1, argv, str(out), ref_hf)
    r = json.loads(out.read_text())
    assert r["expected_vs_start"] > 1e-2, "the reference model must differ from the policy"
    assert r["ref_vs_expected"] < 1e-4, r  # HF vs Megatron fp32 parity is ~5e-7
    assert r["back_vs_trained"] == 0.0, r
    assert r["steps"][0]["actor/ref_kl"] > 1e-4, "policy != reference: KL > 0 from the first update"


def test_ref_load_errors(tiny_models, tiny_model, arithmetic_data, tmp_path):
    from megatron_rlrt.config import ConfigError, parse_config
    from megatron_rlrt.models.qwen3 import CheckpointError
    from tests.helpers.trainer_helpers import train_rank

    with pytest.raises(ConfigError, match="--ref-load .* set --kl-coef > 0"):
        parse_config(_base(tiny_model, arithmetic_data) + ["--ref-load", tiny_model]).validate()
    with pytest.raises(ConfigError, match="--ref-load .*nope: no such directory"):
        parse_config(_base(tiny_model, arithmetic_data) + ["--kl-coef", "0.1", "--ref-load",
                                                           str(tmp_path / "nope")]).validate()
    for bad, message in ((tiny_models["gqa"], "another architecture than the policy's"),
                         (str(tmp_path), "neither a megatron-rlrt checkpoint")):
        argv = _base(tiny_model, arithmetic_data) + ["--kl-coef", "0.1", "--ref-load", bad,
                                                     "--save", str(tmp_path / "run")]
        with pytest.raises(Exception, match=message) as info:
            parallel.spawn(train_rank, 1, argv)
        assert "CheckpointError" in str(info.value) or isinstance(info.value, CheckpointError)


def test_ema_teacher_is_checkpointed_and_restored(tiny_model, arithmetic_data, tmp_path):
    from tests.helpers.trainer_helpers import ema_teacher_rank, train_rank

    run = tmp_path / "run"
    argv = _base(tiny_model, arithmetic_data) + ["--tensor-model-parallel-size", "2", "--advantage-estimator", "rlrt",
                                                 "--teacher-weights", "ema", "--teacher-ema-rate", "0.3",
                                                 "--save", str(run), "--save-interval", "1",
                                                 "--keep-last-n-checkpoints", "3"]
    parallel.spawn(train_rank, 2, argv)
    assert (run / "checkpoints" / "iter_0000002" / "teacher_ema").is_dir()
    out = tmp_path / "ema.json"
    parallel.spawn(ema_teacher_rank, 2, argv, 0.3, str(out))
    r = json.loads(out.read_text())
    assert r["start_step"] == 2
    assert r["teacher_vs_policy"] > 1e-5, "teacher equals the policy: the test would prove nothing"
    assert r["max_abs_diff"] < 1e-6, r
