#!/usr/bin/env python
"""Check a converted checkpoint: run the HF model and the Megatron model (at TP x PP) on the
same prompts in float32 and compare their logits.

Prints max/mean |logit difference| and top-1 agreement; exits 1 when the difference is
above --tolerance or agreement below --min-top1 (run it after every conversion).

    python tools/compare_hf_megatron.py --hf-dir Qwen3-4B --megatron-dir ckpt/qwen3-4b-mcore \
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
    p.add_argument("--hf-dir", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--megatron-dir", required=True, help="megatron-rlrt checkpoint directory (any saved layout)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size to run the Megatron model at")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size to run the Megatron model at")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt to compare on (repeatable; default: three built-in prompts)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest acceptable |logit difference| (both sides run in float32)")
    p.add_argument("--min-top1", type=float, default=0.99, help="smallest acceptable top-1 agreement")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlrt.convert import DEFAULT_PROMPTS, compare
    from megatron_rlrt.models.qwen3 import CheckpointError

    try:
        parity = compare(args.hf_dir, args.megatron_dir, args.tensor_model_parallel_size,
                         args.pipeline_model_parallel_size, args.prompt or DEFAULT_PROMPTS)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ok = parity.ok(args.tolerance, args.min_top1)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"tokens compared      {parity.tokens}")
        print(f"max |logit diff|     {parity.max_abs_logit_diff:.3e}  (tolerance {args.tolerance:g})")
        print(f"mean |logit diff|    {parity.mean_abs_logit_diff:.3e}")
        print(f"top-1 agreement      {parity.top1_agreement:.4f}  (minimum {args.min_top1:g})")
        print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
