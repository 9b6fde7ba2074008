"""``python -m megatron_rlrt.trainer.cli`` / ``megatron-rlrt-train``: parse, validate, train.

Under torchrun every rank runs this; without torchrun it runs as a single rank (TP=PP=1).
An expected failure (bad flag, dataset, checkpoint, rollout engine) is one line on stderr from
rank 0; the other ranks, which fail the same way or follow rank 0's failure, stay silent.
"""

from __future__ import annotations

import os
import sys

from megatron_rlrt.config import ConfigError, parse_config


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _followed_rank0(exc: BaseException) -> bool:
    """A non-zero rank's error that only repeats rank 0's (Trainer._on_rank0 re-raises it so
    that no rank waits forever); rank 0 has printed the real one."""
    return isinstance(exc, RuntimeError) and str(exc).startswith("rank 0 failed while")


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as exc:
        if _rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    from megatron_rlrt import parallel

    if not parallel.under_torchrun():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(parallel.free_port()))
    from megatron_rlrt.trainer.trainer import Trainer

    from megatron_rlrt.data import DatasetError
    from megatron_rlrt.models.qwen3 import CheckpointError
    from megatron_rlrt.rollout.base import RolloutError

    ok = False
    try:
        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
        ok = True
    except (ConfigError, DatasetError, CheckpointError, RolloutError) as exc:
        # a clear one-line error; checkpoints and metrics written so far are complete and kept
        if _rank() == 0:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if _rank() != 0 and _followed_rank0(exc):
            return 2
        raise
    finally:
        parallel.destroy(barrier=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
