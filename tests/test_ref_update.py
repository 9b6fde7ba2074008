"""--ref-update-interval: the KL reference moves to the policy every N steps (TRL's
sync_ref_model, the RLT authors' run), is checkpointed, and a resumed run equals an
uninterrupted one. One rank, RLT (its scorer shares the starting weights with the reference:
the reference must move alone)."""

import json
import shutil

import pytest

from megatron_rlrt import parallel
from megatron_rlrt.config import ConfigError, parse_config
from tests.helpers.trainer_helpers import assert_resumed_steps_equal, train_rank
from tests.test_trainer_e2e import _base


def _metrics(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow  # 6 RL steps of the tiny model
def test_reference_update_moves_the_reference_and_resumes_exactly(tiny_model, arithmetic_data, tmp_path):
    # one mini-batch per step: the step's first forward is the policy the reference was set to
    base = _base(tiny_model, arithmetic_data) + ["--advantage-estimator", "rlt", "--kl-coef", "0.1",
                                                 "--ref-update-interval", "2", "--ref-update-mix", "1",
                                                 "--global-batch-size", "8", "--save-interval", "2",
                                                 "--train-iters", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    parallel.spawn(train_rank, 1, base + ["--save", str(straight), "--keep-last-n-checkpoints", "3"])
    # a run killed right after its step-2 checkpoint (the straight run's), then restarted
    shutil.copytree(straight / "checkpoints" / "iter_0000002", resumed / "checkpoints" / "iter_0000002")
    (resumed / "checkpoints" / "latest").write_text("iter_0000002")
    parallel.spawn(train_rank, 1, base + ["--save", str(resumed)])
    a, b = _metrics(straight), _metrics(resumed)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
    # the reference is the start until the end of step 2, then the policy of that moment
    assert [step for step in a if a[step].get("ref/updated")] == [2, 4]
    assert a[1]["actor/ref_kl"] == pytest.approx(0, abs=1e-7)  # policy = start = reference
    assert a[2]["actor/ref_kl"] > 1e-4  # step 1 moved the policy away from it
    assert a[3]["actor/ref_kl"] == pytest.approx(0, abs=1e-7)  # back to ~0 right after the update
    assert a[4]["actor/ref_kl"] > 1e-4
    assert (straight / "checkpoints" / "iter_0000002" / "reference").is_dir()
    assert "rlrt/lambda" not in a[1]  # rlt has no token weight
    compared = assert_resumed_steps_equal(a, b)
    assert compared > 15 and "rlt/r_kl" in a[4]


def test_reference_update_defaults_and_checks(tiny_models):
    from megatron_rlrt.algorithms.rlt import RLT_REF_UPDATE_INTERVAL, RLT_REF_UPDATE_MIX

    base = ["--hf-checkpoint", tiny_models["tied"], "--prompt-data", "x.jsonl"]
    # the RLT authors' run: beta 0.04, sync_ref_model every 32 steps with mixup alpha 0.9
    assert (RLT_REF_UPDATE_INTERVAL, RLT_REF_UPDATE_MIX) == (32, 0.9)
    assert parse_config(base + ["--advantage-estimator", "rlt", "--kl-coef", "0.04"]).resolved_ref_update() == (32, 0.9)
    assert parse_config(base + ["--advantage-estimator", "rlt"]).resolved_ref_update()[0] == 0  # no KL term
    assert parse_config(base + ["--advantage-estimator", "grpo", "--kl-coef", "0.1"]).resolved_ref_update() == (0, 1.0)
    assert parse_config(base + ["--advantage-estimator", "rlt", "--kl-coef", "0.04", "--ref-update-interval", "0"]
                        ).resolved_ref_update()[0] == 0

    # a reference that moves is its own copy: the initial teacher / RLT's student stay the start
    import torch

    from megatron_rlrt.trainer.setup import reference_weights
    from megatron_rlrt.trainer.weight_snapshot import WeightSnapshot

    initial = WeightSnapshot([torch.arange(3.0)])
    moving = reference_weights(parse_config(base + ["--advantage-estimator", "rlt", "--kl-coef", "0.04"]),
                               None, None, initial)
    moving.tensors[0].add_(1)
    assert moving is not initial and initial.tensors[0].tolist() == [0.0, 1.0, 2.0]
    assert reference_weights(parse_config(base + ["--kl-coef", "0.04"]), None, None, initial) is initial

    def problems(*extra):
        with pytest.raises(ConfigError) as e:
            parse_config(base + list(extra)).validate(world_size=1)
        return str(e.value)

    assert "--ref-update-interval 4: the reference policy is used only by the KL term" in problems(
        "--ref-update-interval", "4")
    assert "--ref-update-mix 1.5 must be in (0, 1]" in problems("--kl-coef", "0.1", "--ref-update-mix", "1.5")
    assert "--ref-update-interval -1 must be >= 0" in problems("--kl-coef", "0.1", "--ref-update-interval", "-1")


def test_console_line_has_the_columns_the_step_logged():
    from megatron_rlrt.trainer.metrics import console_line

    common = {"reward/mean": -1.5, "response/length_mean": 6.0, "loss/pg": 0.01, "actor/entropy": 2.0,
              "actor/grad_norm": 0.5, "perf/step_time_s": 1.25}
    rlt = console_line(1, 2, {**common, "rlt/r_ss": -1.0})
    assert rlt == "step 1/2 | reward -1.500 | len 6.0 | pg 0.0100 | ent 2.000 | gnorm 0.500 | 1.2s"
    rlrt = console_line(2, 2, {**common, "reward/pass_rate_groups": 0.5, "rlrt/lambda": 0.5,
                               "rlrt/weight_mean": float("nan")})
    assert rlrt == ("step 2/2 | reward -1.500 | pass-groups 0.50 | len 6.0 | lambda 0.50 | w - | pg 0.0100 | "
                    "ent 2.000 | gnorm 0.500 | 1.2s")
