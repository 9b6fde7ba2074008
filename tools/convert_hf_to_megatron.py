#!/usr/bin/env python
"""Convert a Hugging Face Qwen3 checkpoint into a megatron-core distributed checkpoint.

The checkpoint is written by TP x PP ranks (started here on one machine, or the ranks of an
enclosing torchrun). megatron's dist_checkpointing stores global tensors, so the result loads
at ANY TP/PP layout later. Run tools/compare_hf_megatron.py afterwards to check parity.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen3-4B --output-dir ckpt/qwen3-4b-mcore \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--hf-dir", required=True, help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("--output-dir", required=True, help="new megatron checkpoint directory (must not exist or be empty)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size of the ranks that write it")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size of the ranks that write it")
    p.add_argument("--params-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype in the checkpoint (default: the HF config's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlrt.convert import hf_to_megatron
    from megatron_rlrt.fsutil import OutputDirError
    from megatron_rlrt.models.qwen3 import CheckpointError

    try:
        hf_to_megatron(args.hf_dir, args.output_dir, args.tensor_model_parallel_size,
                       args.pipeline_model_parallel_size, args.params_dtype, args.overwrite)
    except (CheckpointError, OutputDirError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
