"""Shared fixtures: tiny real-architecture Qwen3 checkpoints with the real Qwen3 tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Three architectures covering what the mapping must get right: tied embeddings (Qwen3-0.6B..4B),
# untied (Qwen3-8B), and GQA with head_dim unrelated to hidden/heads.
TINY_CONFIGS = {
    "tied": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    "untied": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=16, tie_word_embeddings=False),
    "gqa": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """name -> HF checkpoint dir, for every entry of TINY_CONFIGS (float32, seeded)."""
    from tools.make_tiny_qwen3 import make_tiny_qwen3

    root = tmp_path_factory.mktemp("tiny_qwen3")
    return {name: make_tiny_qwen3(str(root / name), seed=i, **cfg) for i, (name, cfg) in enumerate(TINY_CONFIGS.items())}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> str:
    return tiny_models["tied"]


@pytest.fixture(scope="session")
def arithmetic_data(tmp_path_factory):
    from megatron_rlrt.data.generators import reasoning_gym_rows, write_jsonl

    root = tmp_path_factory.mktemp("data")
    rows = list(reasoning_gym_rows("chain_sum", size=16, seed=3,
                                   config={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}))
    for r in rows:  # a reference solution for opsd / --teacher-context reference
        r["solution"] = f"The sum is {r['answer']}. <answer>{r['answer']}</answer>"
    write_jsonl(rows, str(root / "train.jsonl"))
    return str(root / "train.jsonl")


def run_cli(*args, timeout=900, **env):
    """``python -m megatron_rlrt.trainer.cli ARGS`` from the repository root."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "megatron_rlrt.trainer.cli", *args], capture_output=True, text=True,
                          cwd=repo, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def tiny_train_args(model, data, run, iters):
    """A 1-rank CLI run of ``iters`` RL steps on the tiny model, a checkpoint every step."""
    return ["--hf-checkpoint", model, "--prompt-data", data, "--save", str(run), "--train-iters", str(iters),
            "--save-interval", "1", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
            "--rollout-max-response-len", "4", "--advantage-estimator", "grpo", "--reward-workers", "1",
            "--no-progress", "--no-tensorboard"]


@pytest.fixture(scope="session")
def trained_run(tiny_model, arithmetic_data, tmp_path_factory):
    """A run directory from the CLI holding checkpoints iter_0000001, iter_0000002 (latest) and
    metrics.jsonl. Tests copy it before changing anything."""
    run = tmp_path_factory.mktemp("trained") / "run"
    r = run_cli(*tiny_train_args(tiny_model, arithmetic_data, run, 2))
    assert r.returncode == 0, r.stderr[-3000:]
    return run
