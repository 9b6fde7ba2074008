"""``python -m megatron_rlrt.trainer.cli`` / ``megatron-rlrt-train``: parse, validate, train.

Under torchrun every rank runs this; without torchrun it runs as a single rank (TP=PP=1).
"""

from __future__ import annotations

import os
import sys

from megatron_rlrt.config import ConfigError, parse_config


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
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
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        parallel.destroy(barrier=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
