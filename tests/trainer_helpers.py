"""Per-rank functions for trainer tests (importable by spawned ranks) and a test verifier."""

from __future__ import annotations

import json
import os
import time
import zlib

import torch
import torch.distributed as dist

from megatron_rlrt.reward.base import RewardBatch, RewardResult, Verifier


class HashParityVerifier(Verifier):
    """Test-only: 'correct' iff a hash of the response is even. A random tiny model then has
    mixed groups, so every code path that needs correct AND wrong rollouts runs."""

    name = "hash_parity"

    def __init__(self, **_):
        pass

    def score(self, responses, samples) -> RewardBatch:
        start = time.perf_counter()
        results = [RewardResult(1.0, True, "correct") if zlib.crc32(r.encode()) % 2 == 0 else
                   RewardResult(0.0, False, "wrong") for r in responses]
        return RewardBatch.from_results(results, start)


def register_test_rewards() -> None:
    from megatron_rlrt.reward.registry import _REGISTERED, register_reward

    if "hash_parity" not in _REGISTERED:
        register_reward("hash_parity", HashParityVerifier)


def train_rank(argv: list[str], out_path: str | None = None) -> None:
    """Run the trainer with ``argv`` on this rank; rank 0 writes its per-step metrics."""
    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.trainer.trainer import Trainer

    register_test_rewards()
    trainer = Trainer(parse_config(argv))
    try:
        history = trainer.train()
    finally:
        trainer.close()
    if out_path and dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(history, f)
    parallel.destroy()


def methods_rank(base_argv: list[str], methods: list[str], out_path: str) -> None:
    """Two RL steps of every method in one process group; rank 0 records the last metrics."""
    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.trainer.trainer import Trainer

    register_test_rewards()
    results = {}
    for method in methods:
        cfg = parse_config(base_argv + ["--advantage-estimator", method])
        trainer = Trainer(cfg)
        try:
            metrics = [trainer.step(s) for s in range(cfg.train_iters)]
            params = [p.detach().clone() for c in trainer.chunks for p in c.parameters()]
        finally:
            trainer.close()
        if dist.get_rank() == 0:
            results[method] = {"metrics": metrics, "finite_params": all(bool(torch.isfinite(p).all()) for p in params)}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, default=float)
    parallel.destroy()
