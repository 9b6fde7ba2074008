#!/usr/bin/env python
"""Convert a megatron-rlrt checkpoint (converted model or training checkpoint) to Hugging Face.

Writes config.json, safetensors and the tokenizer files, so transformers / vLLM / SGLang load
the result directly. Reads a checkpoint saved at any TP/PP layout (dist_checkpointing reshards).
--megatron-dir may be a checkpoint directory, a checkpoints/ root with a 'latest' file, or a
training run directory (its latest checkpoint is used).

    python tools/convert_megatron_to_hf.py --megatron-dir runs/rlrt/checkpoints --output-dir qwen3-rlrt-hf
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--megatron-dir", required=True, help="megatron-rlrt checkpoint, checkpoints root or run directory")
    p.add_argument("--output-dir", required=True, help="new Hugging Face checkpoint directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written weights (default: the checkpoint's parameter dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlrt.convert import megatron_to_hf
    from megatron_rlrt.fsutil import OutputDirError
    from megatron_rlrt.models.qwen3 import CheckpointError

    try:
        megatron_to_hf(args.megatron_dir, args.output_dir, args.dtype, args.overwrite)
    except (CheckpointError, OutputDirError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
