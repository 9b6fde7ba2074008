"""RLT as a trained method: the trainer's rewards against two separate float64 transformers
forwards, the flag checks of --rlt-student-load, the rollout prompt's data requirement.

The 2-step CLI runs at TP=2 and PP=2 are tests/test_trainer_e2e.py's (it loops over METHODS)."""

import json

import pytest
import torch

from megatron_rlrt.algorithms.rlt import (
    RLT_ALPHA,
    RLT_LAMBDA,
    build_student_view,
    kl_token_estimate,
    rlt_question,
    rlt_reward,
    rlt_rollout_prompt,
    split_explanation,
)
from megatron_rlrt.config import ConfigError, parse_config


def _response_logprobs(model, prompt_ids, response_ids, temperature):
    """float64 log p(response_t | prompt, response_<t) of one sequence, one forward of its own."""
    ids = list(prompt_ids) + list(response_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    pos = torch.arange(len(prompt_ids) - 1, len(ids) - 1)
    return logp[pos, torch.tensor(ids)[pos + 1]]


@pytest.mark.slow  # spawns 2 ranks
def test_trainer_rlt_reward_equals_rlt_math_on_hf_forwards(tiny_model, arithmetic_data, tmp_path):
    """DP=2 (a group's rollouts on both replicas: the all-gather before the group advantage),
    a frozen student other than the policy (--rlt-student-load, another seed), temperature 0.7."""
    from transformers import AutoModelForCausalLM

    from megatron_rlrt import parallel
    from megatron_rlrt.data.dataset import DataConfig, PromptDataset
    from megatron_rlrt.tokenizer import load_tokenizer
    from tests.conftest import TINY_CONFIGS
    from tests.helpers.rlt_ranks import rlt_reward_rank
    from tools.make_tiny_qwen3 import make_tiny_qwen3

    student_dir = make_tiny_qwen3(str(tmp_path / "student"), seed=11, **TINY_CONFIGS["tied"])
    temp, k = 0.7, 4
    argv = ["--hf-checkpoint", tiny_model, "--prompt-data", arithmetic_data, "--advantage-estimator", "rlt",
            "--rlt-student-load", student_dir, "--rollout-temperature", str(temp), "--rollout-batch-size", "2",
            "--n-samples-per-prompt", str(k), "--rollout-max-response-len", "8", "--train-iters", "1",
            "--plugins", "tests.helpers.hash_parity_plugin", "--reward", "hash_parity", "--no-progress",
            "--no-tensorboard"]
    parallel.spawn(rlt_reward_rank, 2, argv, str(tmp_path))
    parts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    rows = sorted((s for p in parts for s in p["samples"]), key=lambda s: s["index"])
    assert all(p["samples"] for p in parts), "both data-parallel replicas scored rollouts"
    assert [s["index"] for s in rows] == list(range(2 * k)) and parts[0]["num_rollouts"] == 2 * k

    tok = load_tokenizer(tiny_model)
    dataset = PromptDataset.from_config(DataConfig(path=arithmetic_data), tok)
    by_prompt = {tuple(rlt_rollout_prompt(tok, row)): row for row in dataset}
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float64).eval()
    ref = []
    for s in rows:
        row = by_prompt[tuple(s["prompt_ids"])]  # the rollout prompt is the row's RLT teacher prompt
        expl, matched = split_explanation(tok, s["response_ids"])
        view = build_student_view(tok, rlt_question(row), expl, row.solution)
        assert (view.prompt_ids, view.response_ids, matched) == (s["view_prompt_ids"], s["view_response_ids"],
                                                                  s["matched"])
        t_lp = _response_logprobs(teacher, s["prompt_ids"], s["response_ids"], temp)[: len(expl)]
        s_lp = _response_logprobs(student, view.prompt_ids, view.response_ids, temp)
        sol = s_lp[view.solution][None]
        kl = kl_token_estimate(t_lp[None], s_lp[view.explanation][None])
        out = rlt_reward(sol, torch.ones_like(sol, dtype=torch.bool), kl, torch.ones_like(kl, dtype=torch.bool),
                         RLT_ALPHA, RLT_LAMBDA, matched=torch.tensor([matched]))
        ref.append(out.reward.item())
    got = [s["reward"] for s in rows]
    assert got == pytest.approx(ref, abs=1e-4), (got, ref)  # measured: 7e-7
    assert max(ref) - min(ref) > 1e-2  # rollouts really differ
    # GRPO with std normalisation over each prompt's K rollouts, gathered from both replicas
    r = torch.tensor(got, dtype=torch.float64).view(-1, k)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
    assert [s["advantage"] for s in rows] == pytest.approx(adv.tolist(), abs=1e-4)
    # reward/mean from the last stages equals the mean over every rollout
    total, weight = map(sum, zip(*(p["metrics"]["reward/mean"] for p in parts)))
    assert total / weight == pytest.approx(sum(ref) / len(ref), abs=1e-4)


def test_rlt_student_load_checks(tiny_models, tmp_path):
    from megatron_rlrt.models.qwen3 import CheckpointError, Qwen3Spec
    from megatron_rlrt.trainer.setup import load_snapshot

    base = ["--hf-checkpoint", tiny_models["tied"], "--prompt-data", "x.jsonl"]

    def problems(*extra):
        with pytest.raises(ConfigError) as e:
            parse_config(base + list(extra)).validate(world_size=1)
        return str(e.value)

    assert "--rlt-student-load /no/such/dir: no such directory" in problems(
        "--advantage-estimator", "rlt", "--rlt-student-load", "/no/such/dir")
    assert "only a method with a model-computed reward (rlt)" in problems(
        "--advantage-estimator", "grpo", "--rlt-student-load", tiny_models["tied"])
    assert "--dynamic-sampling with --advantage-estimator rlt" in problems("--advantage-estimator", "rlt",
                                                                          "--dynamic-sampling")
    arch = Qwen3Spec.from_hf_dir(tiny_models["tied"])
    with pytest.raises(CheckpointError, match=r"--rlt-student-load .*another architecture than the policy's"):
        load_snapshot(tiny_models["gqa"], "--rlt-student-load", None, arch)
    with pytest.raises(CheckpointError, match=r"--rlt-student-load .*neither a megatron-rlrt checkpoint"):
        load_snapshot(str(tmp_path), "--rlt-student-load", None, arch)


def test_rlt_rollout_prompt_needs_a_reference_solution():
    from types import SimpleNamespace

    from megatron_rlrt.tokenizer import load_tokenizer

    row = SimpleNamespace(source="train.jsonl:7", prompt=[{"role": "user", "content": "1 + 1 = ?"}], solution=None)
    with pytest.raises(ValueError, match=r"train.jsonl:7: RLT needs a reference solution"):
        rlt_rollout_prompt(load_tokenizer(), row)
    row.solution = "2"
    tok = load_tokenizer()
    text = tok.decode(rlt_rollout_prompt(tok, row))
    assert "1 + 1 = ?" in text and text.endswith("<|begin_of_explanation|>\n\n") and "\n\n2\n\n" in text


def test_rlt_recipe_is_the_authors_run():
    import os

    from megatron_rlrt.algorithms.rlt import RLT_LOGPROB_TEMPERATURE

    recipe = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "recipes", "rlt_teacher_qwen3_8b.yaml")
    cfg = parse_config(["--config", recipe])
    assert cfg.advantage_estimator == "rlt" and cfg.resolved_std_normalize()
    assert (cfg.rlt_alpha, cfg.rlt_lambda, cfg.rollout_temperature) == (RLT_ALPHA, RLT_LAMBDA, RLT_LOGPROB_TEMPERATURE)
    assert cfg.rollout_batch_size * cfg.n_samples_per_prompt == cfg.global_batch_size == 1024
    assert (cfg.lr, cfg.train_iters, cfg.rollout_max_response_len) == (1e-6, 125, 16384)
    assert (cfg.kl_coef, cfg.resolved_ref_update()) == (0.04, (32, 0.9))  # beta; sync_ref_model every 32, mix 0.9

