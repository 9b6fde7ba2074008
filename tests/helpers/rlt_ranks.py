"""Per-rank function of tests/test_rlt_trainer.py (spawned ranks import it by name)."""

from __future__ import annotations

import json
import os

import torch.distributed as dist


def rlt_reward_rank(argv: list[str], out_dir: str) -> None:
    """One step's RLT rewards as the trainer computes them: the batch, the old-policy pass and
    the frozen student's pass; every last-stage, TP-rank-0 rank writes its samples' tokens,
    rewards and advantages to ``out_dir/rank{R}.json``."""
    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.trainer.metrics import MetricSums
    from megatron_rlrt.trainer.model_reward import apply_model_reward
    from megatron_rlrt.trainer.rollout_batch import dp_shard
    from megatron_rlrt.trainer.trainer import Trainer

    cfg = parse_config(argv)
    trainer = Trainer(cfg)
    try:
        ps = trainer.ps
        batch = trainer.make_batch(0)
        local = dp_shard(batch.samples, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        scores = trainer.score(local)
        sums = MetricSums()
        rewarded = apply_model_reward(trainer.chunks, local, scores, trainer.method, trainer.scorer, trainer.opts,
                                      cfg.micro_batch_size, None, cfg, sums)
        if trainer.is_last_stage and ps.get_tensor_model_parallel_rank() == 0:
            rows = [{"index": s.index, "group": s.group, "prompt_ids": s.prompt_ids, "response_ids": s.response_ids,
                     "view_prompt_ids": s.reward_view.prompt_ids, "view_response_ids": s.reward_view.response_ids,
                     "spans": s.reward_view.spans, "matched": s.reward_view.flags["matched"],
                     "reward": s.reward, "advantage": s.advantage} for s in rewarded]
            with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
                json.dump({"samples": rows, "num_rollouts": len(batch.samples),
                           "metrics": {k: v for k, v in sums.sums.items()}}, f)
    finally:
        trainer.close()
    parallel.destroy()
