"""A method as a plug-in (examples/plugins/rloo.py): one file, one registration, this test.

The registries are the single source of truth: the RLOO estimator computes what its formula
says, the batch builder uses the method's registered estimator, and the CLI trains with a
method it learns of through --plugins only.
"""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from megatron_rlrt.config import ConfigError, import_plugins, parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RLOO = os.path.join(REPO, "examples", "plugins", "rloo.py")


@pytest.fixture(scope="module")
def rloo():
    import_plugins(RLOO)
    from megatron_rlrt.algorithms import ADVANTAGES, METHODS

    return METHODS["rloo"], ADVANTAGES["rloo"]


def test_rloo_advantage_is_leave_one_out(rloo):
    _, estimator = rloo
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv, stats = estimator(rewards, 4, False)
    # group 0: r_i - mean of the other three
    assert torch.allclose(adv[:4], torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]))
    assert torch.equal(adv[4:], torch.zeros(4))  # all equal: no signal
    assert stats.num_zero_signal_groups == 1 and stats.zero_signal_mask.tolist() == [False] * 4 + [True] * 4


def test_the_batch_builder_uses_the_methods_registered_estimator(rloo):
    """build_rollout_batch on fake rank-0 services: the samples carry the plug-in's advantages."""
    from megatron_rlrt.algorithms import get_method, group_advantages
    from megatron_rlrt.trainer.rollout_batch import build_rollout_batch

    method, estimator = rloo
    correct = [True, False, False, True, True, False, True, True]
    rollout = lambda i: types.SimpleNamespace(response_ids=[5, 6, i + 7], logprobs=[-1.0] * 3,  # noqa: E731
                                              finish_reason="stop")
    prompt = lambda g: types.SimpleNamespace(prompt_ids=[1, 2, g], messages=[], solution=None, answer="1",  # noqa: E731
                                             source=f"row {g}")

    class Scored:
        def __init__(self, n):
            self.correct, self.rewards = correct[:n], [float(c) for c in correct[:n]]
            self.stats = types.SimpleNamespace(to_metrics=lambda prefix: {})

    services = types.SimpleNamespace(
        loader=types.SimpleNamespace(next_batch=lambda n: [prompt(g) for g in range(n)], epoch=0),
        engine=types.SimpleNamespace(generate=lambda ids, k, params: [[rollout(g * k + j) for j in range(k)]
                                                                       for g in range(len(ids))]),
        sampling=lambda seed=None: None, release_engine=lambda: None,
        tokenizer=types.SimpleNamespace(decode=lambda ids, **kw: str(ids)),
        reward=types.SimpleNamespace(score=lambda texts, prompts: Scored(len(texts))))
    cfg = parse_config(["--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--no-progress", "--no-std-normalize"])
    rewards = torch.tensor([float(c) for c in correct])
    for spec, want in ((method, estimator(rewards, 4, False)[0]), (get_method("grpo"), group_advantages(rewards, 4, False)[0])):
        batch = build_rollout_batch(services, cfg, spec, step=0)
        assert [s.advantage for s in batch.samples] == pytest.approx(want.tolist())
        assert batch.metrics["reward/mean"] == pytest.approx(5 / 8)


def test_register_method_needs_a_registered_advantage():
    from megatron_rlrt.algorithms import MethodSpec, register_method

    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'"):
        register_method(MethodSpec("broken", advantage="nope"))


@pytest.mark.slow
def test_a_plugin_method_trains_from_the_cli(tiny_model, arithmetic_data, tmp_path):
    """megatron-rlrt-train --plugins examples/plugins/rloo.py --advantage-estimator rloo: one RL step."""
    run = tmp_path / "run"
    args = ["--plugins", f"{RLOO},tests.helpers.hash_parity_plugin", "--advantage-estimator", "rloo",
            "--hf-checkpoint", tiny_model, "--prompt-data", arithmetic_data, "--reward", "hash_parity",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--rollout-max-response-len", "6",
            "--train-iters", "1", "--lr", "1e-3", "--lr-warmup-iters", "0", "--no-progress", "--no-tensorboard",
            "--save", str(run)]
    r = subprocess.run([sys.executable, "-m", "megatron_rlrt.trainer.cli", *args], capture_output=True, text=True,
                       cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and rows[-1]["actor/grad_norm"] > 0
    # without the plug-in the same flags are rejected before any work, naming the registry
    r = subprocess.run([sys.executable, "-m", "megatron_rlrt.trainer.cli", *args[2:]], capture_output=True,
                       text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "--advantage-estimator 'rloo': not a registered name" in r.stderr


def test_plugin_import_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="bad_plugin.py: could not import it .RuntimeError: boom"):
        import_plugins(str(bad))
