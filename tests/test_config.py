"""Configuration: flags, recipes, validation before any work, and clean CLI errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from megatron_rlrt.config import Config, ConfigError, build_parser, load_recipe, parse_config
from tests.helpers.torchrun import torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "examples", "recipes")


def test_every_option_has_a_flag_with_help():
    help_text = build_parser().format_help()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text or f"--no-{f.name.replace('_', '-')}" in help_text, flag
        assert len(f.metadata["help"]) > 15, f"{flag} needs a real description"


def test_megatron_and_slime_flag_names():
    cfg = parse_config(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                        "--micro-batch-size", "3", "--lr", "1e-5", "--advantage-estimator", "rlsd",
                        "--rlrt-lambda", "0.3", "--rlrt-clip-eps", "0.2", "--rlrt-lambda-decay-steps", "50",
                        "--teacher-context", "answer", "--n-samples-per-prompt", "4", "--rollout-batch-size", "8",
                        "--global-batch-size", "16", "--eps-clip", "0.2", "--eps-clip-high", "0.28", "--tis-clip", "2"])
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.micro_batch_size) == (2, 2, 3)
    assert cfg.optimizer_steps_per_rl_step == 2
    assert cfg.resolved_std_normalize() is True  # RLSD keeps std normalisation (Table 5)
    assert parse_config(["--advantage-estimator", "grpo"]).resolved_std_normalize() is False


@pytest.mark.parametrize("name,eps_w,decay,thinking", [
    ("qwen3_4b_base", 1.0, None, False), ("qwen3_8b_base", 1.0, None, False),
    ("qwen3_4b_instruct", 0.5, 30, False), ("qwen3_8b_thinking", 0.2, 30, True)])
def test_table5_recipes(name, eps_w, decay, thinking):
    cfg = parse_config(["--config", os.path.join(RECIPES, f"{name}.yaml"), "--lr", "2e-6"])
    assert cfg.advantage_estimator == "rlrt" and cfg.rlrt_lambda == 0.5
    assert (cfg.rlrt_clip_eps, cfg.rlrt_lambda_decay_steps, cfg.enable_thinking) == (eps_w, decay, thinking)
    assert (cfg.rollout_batch_size, cfg.n_samples_per_prompt, cfg.global_batch_size) == (256, 8, 1024)
    assert (cfg.eps_clip, cfg.eps_clip_high, cfg.tis_clip, cfg.kl_coef) == (0.2, 0.28, 2.0, 0.0)
    assert (cfg.rollout_max_prompt_len, cfg.rollout_max_response_len, cfg.weight_decay) == (2048, 20480, 0.01)
    assert cfg.lr == 2e-6  # the command line overrides the recipe


def test_recipe_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rlrt-lamda: 0.5\n")
    with pytest.raises(ConfigError, match="unknown option 'rlrt-lamda'"):
        load_recipe(str(bad))
    bad.write_text("kl-type: k2\n")
    with pytest.raises(ConfigError, match="expected one of"):
        load_recipe(str(bad))
    bad.write_text("lr: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(bad))


def test_registry_names_are_checked_against_the_registries(tiny_model, tmp_path):
    """Method, engine and verifier names come from METHODS / ENGINES / the reward registry,
    not from argparse choices: an unknown name is a validation error listing the registered ones."""
    from megatron_rlrt.algorithms import METHODS
    from megatron_rlrt.rollout.registry import ENGINES

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    cfg = parse_config(["--hf-checkpoint", tiny_model, "--prompt-data", str(data), "--advantage-estimator", "ppo",
                        "--rollout-engine", "tgi", "--reward", "nope"])
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    assert f"--advantage-estimator 'ppo': not a registered name; registered methods: {sorted(METHODS)}" in text
    assert f"--rollout-engine 'tgi': not a registered name; registered engines: {sorted(ENGINES)}" in text
    assert "--reward 'nope': not a registered name" in text
    assert all(m in build_parser().format_help() for m in METHODS)  # --help lists the registered methods


def test_plugins_flag_errors_name_the_module(tmp_path):
    with pytest.raises(ConfigError, match="--plugins no_such_plugin_module: could not import it"):
        parse_config(["--plugins", "no_such_plugin_module"])
    with pytest.raises(ConfigError, match="--plugins .*missing.py: could not import it"):
        parse_config(["--plugins", str(tmp_path / "missing.py")])


def test_invalid_combinations_name_their_flags(tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    cfg = parse_config(["--hf-checkpoint", tiny_model, "--prompt-data", str(data), "--rollout-batch-size", "3",
                        "--n-samples-per-prompt", "4", "--global-batch-size", "8", "--rlrt-lambda", "1.5",
                        "--tensor-model-parallel-size", "2"])
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=3)
    text = str(err.value)
    assert "--global-batch-size 8 must divide --rollout-batch-size x --n-samples-per-prompt = 12" in text
    assert "--rlrt-lambda 1.5 must be in [0, 1]" in text
    assert "world size 3 is not divisible by --tensor-model-parallel-size" in text
    with pytest.raises(ConfigError, match="--prompt-data is required"):
        parse_config(["--hf-checkpoint", tiny_model]).validate()


def test_distillation_methods_validate_with_context_parallelism(tiny_model, tmp_path):
    """sdpo/srpo/opsd at --context-parallel-size 2 pass the CLI's validation (top-K distillation
    runs under CP: tests/test_long_context.py::test_distillation_step_at_cp2_equals_cp1)."""
    from megatron_rlrt.algorithms.methods import METHODS

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2", "solution": "2"}) + "\n")
    distill = [name for name, spec in METHODS.items() if spec.uses_distillation]
    assert {"sdpo", "srpo", "opsd"} <= set(distill)
    for name in distill:
        parse_config(["--hf-checkpoint", tiny_model, "--prompt-data", str(data), "--advantage-estimator", name,
                      "--context-parallel-size", "2"]).validate(world_size=2)


def _cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "megatron_rlrt.trainer.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_cli_rejects_bad_flags_before_starting():
    r = _cli("--prompt-data", "/nonexistent.jsonl", "--hf-checkpoint", "/nonexistent")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--prompt-data /nonexistent.jsonl: no such file" in r.stderr


def test_cli_reports_a_bad_dataset_row(tiny_model, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    run = tmp_path / "run"
    r = _cli("--hf-checkpoint", tiny_model, "--prompt-data", str(data), "--save", str(run), "--train-iters", "1",
             "--rollout-batch-size", "1", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "4",
             "--no-progress")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert f"{data}" in r.stderr and "2" in r.stderr  # the file and its row
    assert not (run / "checkpoints").exists()


# -- issue #13, item 4: every bad input is one line naming its flag, from rank 0 only ----------

def _ok_args(model, data):
    return ["--hf-checkpoint", model, "--prompt-data", data, "--rollout-batch-size", "2", "--n-samples-per-prompt", "2"]


@pytest.mark.parametrize("flags, named", [
    (["--n-samples-per-prompt", "0", "--global-batch-size", "4"], "--n-samples-per-prompt must be >= 1 (got 0)"),  # was ZeroDivisionError
    (["--log-interval", "0"], "--log-interval must be >= 1"),  # was a crash after step 1
    (["--reward-timeout", "-1"], "--reward-timeout -1.0 must be > 0"),  # was a traceback after the model was built
    (["--eval-n-samples", "0"], "--eval-n-samples must be >= 1"),
    (["--tensor-model-parallel-size", "3"], "not divisible by --tensor-model-parallel-size 3"),  # 4 heads
])
def test_bad_flags_are_one_line_naming_the_flag(tiny_model, arithmetic_data, flags, named):
    cfg = parse_config(_ok_args(tiny_model, arithmetic_data) + flags)
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=3 if "3" in flags else 1)
    assert named in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_flag_abbreviations_are_refused():
    with pytest.raises(ConfigError, match="unrecognized arguments: --train-iter 3"):
        parse_config(["--train-iter", "3"])
    assert parse_config(["--train-iters", "3"]).train_iters == 3


def test_recipe_type_and_file_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train-iters: 2.7\n")  # the CLI rejects 2.7 for an int flag; so does a recipe
    with pytest.raises(ConfigError, match="option 'train-iters' = 2.7: expected an integer"):
        load_recipe(str(recipe))
    recipe.write_text("train-iters: 3\nlr: 2\n")
    assert load_recipe(str(recipe)) == {"train_iters": 3, "lr": 2.0}
    with pytest.raises(ConfigError, match=f"--config {tmp_path}: is a directory"):
        load_recipe(str(tmp_path))
    recipe.write_bytes("lr: 1e-6  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_recipe(str(recipe))


def test_cli_bad_flag_is_one_line_from_rank_0_and_silent_elsewhere(tiny_model, arithmetic_data):
    """Under torchrun every rank validates; only rank 0 speaks (argparse's usage text too)."""
    for args in ([*_ok_args(tiny_model, arithmetic_data), "--log-interval", "0"], ["--train-iter", "3"]):
        r0 = _cli(*args, RANK="0", WORLD_SIZE="2")
        r1 = _cli(*args, RANK="1", WORLD_SIZE="2")
        assert r0.returncode == r1.returncode == 2
        assert len(r0.stderr.strip().splitlines()) == 1 and r0.stderr.startswith("error: "), r0.stderr
        assert r1.stderr.strip() == "" and r1.stdout.strip() == ""


def test_cli_rank0_failure_under_torchrun_is_one_line(tiny_model, tmp_path):
    """Rank 0 fails inside the trainer (a bad dataset row): one error line in all, the other rank
    exits without its own traceback."""
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    r = torchrun(["-m", "megatron_rlrt.trainer.cli", "--hf-checkpoint", tiny_model, "--prompt-data", str(data),
                  "--save", str(tmp_path / "run"), "--train-iters", "1", "--rollout-batch-size", "1",
                  "--n-samples-per-prompt", "2", "--rollout-max-response-len", "4", "--tensor-model-parallel-size", "2",
                  "--no-progress", "--no-tensorboard"])
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(data) in errors[0], r.stderr[-4000:]
    # torchrun's own summary (a traceback through torch/distributed/run.py) may follow; none of ours
    assert "megatron_rlrt/" not in r.stderr and "rank 0 failed while" not in r.stderr, r.stderr[-4000:]

