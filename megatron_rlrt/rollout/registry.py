"""Rollout engines by name: adding one is a file plus one entry in ``ENGINES``."""

from __future__ import annotations

from typing import Callable

import torch

from megatron_rlrt.rollout.base import RolloutEngine


def _hf(cfg, hf_dir: str, tokenizer) -> RolloutEngine:
    import os

    from megatron_rlrt.platform import current_device
    from megatron_rlrt.rollout.hf_engine import HFEngine

    device = current_device()
    # on a CPU the other ranks wait during rollout: generate with every core of this machine
    threads = None if device.type == "cuda" else os.cpu_count()
    return HFEngine(hf_dir, device=device, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                    max_batch_size=cfg.rollout_batch_size_per_forward, seed=cfg.seed,
                    eos_token_ids=[tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [],
                    progress=cfg.progress, num_threads=threads)


def _server_kwargs(cfg, hf_dir: str) -> dict:
    launch_colocated = cfg.colocate and not cfg.rollout_urls
    if launch_colocated:  # the servers span this node's training GPUs (torchrun's LOCAL_WORLD_SIZE)
        from megatron_rlrt.rollout.fleet import colocated_num_gpus

        gpus = dict(rollout_num_gpus=colocated_num_gpus(cfg.rollout_num_gpus_per_engine))
    else:
        gpus = {}
    return dict(**gpus, model_path=cfg.rollout_model_path or hf_dir, rollout_urls=cfg.rollout_urls, colocate=cfg.colocate,
                rollout_num_gpus_per_engine=cfg.rollout_num_gpus_per_engine,
                update_weight_buffer_size=cfg.update_weight_buffer_size, seed=cfg.seed, progress=cfg.progress,
                quantization=cfg.rollout_quantization, weight_sync_dir=cfg.weight_sync_dir,
                host=cfg.rollout_host or "127.0.0.1")


def _sglang(cfg, hf_dir: str, tokenizer) -> RolloutEngine:
    from megatron_rlrt.rollout.sglang_engine import SGLangEngine

    return SGLangEngine(**_server_kwargs(cfg, hf_dir), weight_sync=cfg.weight_sync,
                        router_url=cfg.rollout_router_url)


def _vllm(cfg, hf_dir: str, tokenizer) -> RolloutEngine:
    from megatron_rlrt.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(**_server_kwargs(cfg, hf_dir))


ENGINES: dict[str, Callable] = {"hf": _hf, "sglang": _sglang, "vllm": _vllm}
# Engines that run as servers: colocated, every node launches its own (rollout/fleet.py).
SERVER_ENGINES: set[str] = {"sglang", "vllm"}


def register_engine(name: str, factory: Callable, servers: bool = False) -> None:
    ENGINES[name] = factory
    (SERVER_ENGINES.add if servers else SERVER_ENGINES.discard)(name)


def create_engine(cfg, hf_dir: str, tokenizer) -> RolloutEngine:
    if cfg.rollout_engine not in ENGINES:
        raise ValueError(f"--rollout-engine {cfg.rollout_engine!r} is not available; known: {sorted(ENGINES)}")
    return ENGINES[cfg.rollout_engine](cfg, hf_dir, tokenizer)
