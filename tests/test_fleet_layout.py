"""Colocated layout checks. How many GPUs of a node the colocated servers span (rollout/fleet.colocated_num_gpus): the
node's training ranks (torchrun's LOCAL_WORLD_SIZE), checked against the visible GPUs and the
engine TP size; the counts are injected, so this runs on a CPU."""

from __future__ import annotations

import pytest
import torch

from megatron_rlrt.rollout.fleet import colocated_num_gpus


@pytest.mark.parametrize("local_world,tp,visible", [(8, 2, 8), (4, 4, 8), (2, 1, None), (1, 1, None)])
def test_servers_span_the_training_gpus_of_the_node(local_world, tp, visible):
    # 4 training ranks on an 8-GPU node: the servers take the 4 training GPUs, not all 8
    assert colocated_num_gpus(tp, local_world, visible) == local_world


def test_tp_size_must_divide_the_training_gpus():
    with pytest.raises(ValueError, match=r"8 training GPUs \(LOCAL_WORLD_SIZE.*--rollout-num-gpus-per-engine 3 must divide 8"):
        colocated_num_gpus(3, 8, 8)


def test_fewer_visible_gpus_than_training_ranks_is_refused():
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE=8 training ranks .* only 4 GPU\(s\) are visible"):
        colocated_num_gpus(2, 8, 4)


def test_local_world_size_comes_from_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "6")
    assert colocated_num_gpus(3, visible_gpus=None) == 6
    with pytest.raises(ValueError, match="must divide 6"):
        colocated_num_gpus(4, visible_gpus=None)


def test_server_kwargs_pass_the_count_when_launching_colocated(monkeypatch):
    from dataclasses import replace

    from megatron_rlrt.config import Config
    from megatron_rlrt.rollout.registry import _server_kwargs

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # 4 of 8 GPUs train: the servers take those 4
    cfg = Config(hf_checkpoint="x", rollout_engine="sglang", colocate=True, rollout_num_gpus_per_engine=2)
    assert _server_kwargs(cfg, "x")["rollout_num_gpus"] == 4

    assert "rollout_num_gpus" not in _server_kwargs(replace(cfg, rollout_urls="http://h:1"), "x")
    assert "rollout_num_gpus" not in _server_kwargs(replace(cfg, colocate=False), "x")


def test_colocated_vllm_without_cuda_is_refused(monkeypatch):
    """vLLM's CPU build has no sleep mode: colocated it would keep its memory while the trainer
    trains, so the engine refuses before launching anything."""
    from megatron_rlrt.rollout.vllm_engine import VLLMEngine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="vllm --colocate needs CUDA: vLLM's CPU build has no sleep mode"):
        VLLMEngine(model_path="/nonexistent", colocate=True)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1])
def test_sglang_memory_fraction_must_be_a_fraction(fraction):
    from megatron_rlrt.rollout.sglang_engine import SGLangEngine

    with pytest.raises(ValueError, match=r"mem_fraction_static=.*expected a fraction in \(0, 1\).*trainer's"):
        SGLangEngine(model_path="/nonexistent", colocate=True, mem_fraction_static=fraction)
