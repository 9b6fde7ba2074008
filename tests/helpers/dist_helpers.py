"""Per-rank functions that tests start through megatron_rlrt.parallel.spawn.

They live in a module (not in test files) so spawned ranks can import them by name.
Results travel back as JSON files written by the rank that has them.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from megatron_rlrt import parallel


def hf_parity_rank(hf_dirs: dict, tp: int, pp: int, out_path: str) -> None:
    """Load each HF checkpoint straight into Megatron at TP x PP; record logit diffs vs HF."""
    from transformers import AutoModelForCausalLM

    from megatron_rlrt.models.forward import forward_logits
    from megatron_rlrt.models.hf_checkpoint import load_hf_weights
    from megatron_rlrt.models.megatron_checkpoint import load_hf_into_model
    from megatron_rlrt.models.qwen3 import Qwen3Spec, build_model, transformer_config

    parallel.initialize(parallel.ParallelLayout(tp, pp))
    results = {}
    tokens = torch.randint(0, 151_000, (3, 17), generator=torch.Generator().manual_seed(7))
    for name, hf_dir in hf_dirs.items():
        spec = Qwen3Spec.from_hf_dir(hf_dir)
        config = transformer_config(spec, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                    params_dtype=torch.float32, perform_initialization=False)
        chunks = build_model(spec, config)
        load_hf_into_model(chunks, spec, load_hf_weights(hf_dir, spec))
        logits = forward_logits(chunks, tokens)
        if logits is not None and dist.get_rank() == dist.get_world_size() - 1:
            ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(tokens).logits
            results[name] = {"max_abs_diff": (logits - ref).abs().max().item(),
                             "top1": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                             "ref_abs_max": ref.abs().max().item()}
    if results:
        with open(out_path, "w") as f:
            json.dump(results, f)
    parallel.destroy()
