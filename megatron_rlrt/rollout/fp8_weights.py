"""FP8 rollouts: the trainer's bf16 weights, quantised the way a blockwise-FP8 checkpoint stores them.

With ``--rollout-quantization fp8`` the rollout servers run W8A8 FP8 GEMMs (SGLang / vLLM
``--quantization fp8``) from a checkpoint in the DeepSeek-V3 / Qwen3-FP8 layout: every linear
weight of the transformer layers is float8_e4m3fn with one fp32 ``weight_scale_inv`` per 128 x 128
block (``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
"dynamic", "weight_block_size": [128, 128]}``; activations are quantised per 1 x 128 group by the
server). Embedding, LM head and norms stay bf16. Each weight update sends the same layout:
``quantize_for_rollout`` turns the HF-named bf16 tensors of a bucket into (fp8 weight, scale)
pairs, which SGLang loads natively and vLLM reloads through its FP8 checkpoint loader -- as verl
and slime do for their FP8 rollouts. Start the servers from such a checkpoint (e.g.
``Qwen/Qwen3-8B-FP8``, or ``tools/quantize_fp8_checkpoint.py`` output) so that their
``quantization_config`` matches what the updates send.

The trainer still computes log-probs in its own precision; the rollout-vs-trainer mismatch
this creates is what truncated importance sampling (``--tis-clip``) corrects.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [BLOCK, BLOCK]}
# HF names of the Qwen3 weights a blockwise-FP8 checkpoint stores in FP8 (Qwen3-8B-FP8 keeps
# embed_tokens, lm_head and every norm in bf16).
FP8_WEIGHT_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                       "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                       "mlp.down_proj.weight")


def is_fp8_weight(name: str) -> bool:
    return name.endswith(FP8_WEIGHT_SUFFIXES)


def quantize_blockwise(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 scale_inv [ceil(N/block), ceil(K/block)]) of a 2-D weight:
    each block is divided by scale_inv = amax(block) / 448 (1 for an all-zero block), so that
    ``weight ~= q.float() * scale_inv`` expanded over its block. Edge blocks may be smaller."""
    if weight.dim() != 2:
        raise ValueError(f"blockwise FP8 needs a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    rows, cols = -(-n // block), -(-k // block)
    w = weight.detach().float()
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w
    tiles = padded.view(rows, block, cols, block)
    amax = tiles.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(rows * block, cols * block)[:n, :k].contiguous(), scale_inv.contiguous()


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """fp32 weight back from ``quantize_blockwise``'s output."""
    n, k = q.shape
    scale = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return q.float() * scale


def quantize_for_rollout(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors as a blockwise-FP8 checkpoint holds them: ``x.weight`` of every linear
    layer becomes ``x.weight`` (FP8) and ``x.weight_scale_inv`` (fp32); the rest passes through."""
    for name, tensor in named:
        if is_fp8_weight(name):
            q, scale_inv = quantize_blockwise(tensor)
            yield name, q
            yield name + "_scale_inv", scale_inv
        else:
            yield name, tensor


def quantize_buckets(buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``quantize_for_rollout`` per weight-sync bucket (a bucket stays one bucket)."""
    for bucket in buckets:
        yield list(quantize_for_rollout(bucket))
