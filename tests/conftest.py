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
