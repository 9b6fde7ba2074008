#!/usr/bin/env python
"""Write a blockwise-FP8 copy of a Hugging Face Qwen3 checkpoint for FP8 rollout servers.

The layout of Qwen/Qwen3-8B-FP8 and DeepSeek-V3: the transformer layers' linear weights in
float8_e4m3fn with one fp32 ``weight_scale_inv`` per 128 x 128 block, embedding / LM head /
norms unchanged, ``quantization_config`` = {quant_method fp8, fmt e4m3, activation_scheme
dynamic, weight_block_size [128, 128]} in config.json. Pass the result as
``--rollout-model-path`` with ``--rollout-quantization fp8`` (the servers start from it; every
weight update then arrives in the same layout, see megatron_rlrt/rollout/fp8_weights.py).

    python tools/quantize_fp8_checkpoint.py --hf-dir /models/Qwen3-8B-Base --output-dir /models/Qwen3-8B-Base-FP8
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--hf-dir", required=True, help="Hugging Face Qwen3 checkpoint (bf16 or fp32 safetensors)")
    p.add_argument("--output-dir", required=True, help="new checkpoint directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    return p


def quantize_checkpoint(hf_dir: str, output_dir: str, overwrite: bool = False) -> str:
    from megatron_rlrt.fsutil import atomic_output_dir
    from megatron_rlrt.models.hf_checkpoint import load_hf_weights, save_hf_checkpoint
    from megatron_rlrt.models.qwen3 import Qwen3Spec, read_hf_config
    from megatron_rlrt.rollout.fp8_weights import QUANTIZATION_CONFIG, quantize_for_rollout

    config = read_hf_config(hf_dir)
    if config.get("quantization_config"):
        raise ValueError(f"{hf_dir}: already quantized ({config['quantization_config']})")
    weights = load_hf_weights(hf_dir, Qwen3Spec.from_hf_config(config, os.path.join(hf_dir, "config.json")))
    with atomic_output_dir(output_dir, overwrite) as tmp:
        save_hf_checkpoint(tmp, {**config, "quantization_config": dict(QUANTIZATION_CONFIG)},
                           quantize_for_rollout((name, weights[name]) for name in weights), aux_dir=hf_dir)
    return output_dir


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlrt.fsutil import OutputDirError
    from megatron_rlrt.models.qwen3 import CheckpointError

    try:
        quantize_checkpoint(args.hf_dir, args.output_dir, args.overwrite)
    except (CheckpointError, OutputDirError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
