"""Forward passes through megatron's pipeline schedules.

Everything that runs the Megatron model (tools, tests, trainer) goes through
``get_forward_backward_func()`` so that PP/VPP take megatron's own path. This module holds
the pieces shared by those callers: masks/positions for a batch, and a forward that returns
full-vocabulary logits (for parity checks and small evaluations; training never gathers
the vocabulary).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """Megatron's mask convention: bool [1, 1, s, s], True where attention is NOT allowed."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def positions(batch: int, seq_len: int, device=None) -> torch.Tensor:
    return torch.arange(seq_len, device=device).unsqueeze(0).expand(batch, -1)


def model_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def run_forward_only(
    chunks: Sequence[torch.nn.Module],
    microbatches: Sequence[dict],
    collect: Callable[[torch.Tensor, dict], dict],
    seq_length: int,
    micro_batch_size: int = 1,
) -> list[dict]:
    """Run ``microbatches`` (dicts with tokens/position_ids/attention_mask) forward-only.

    ``collect(output, batch)`` runs on the last pipeline stage and returns a dict that is
    handed back in the result list (empty list on other stages).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])

        def loss_func(output_tensor):
            return torch.zeros((), device=output_tensor.device), collect(output_tensor, batch)

        return output, loss_func

    chunks = list(chunks)
    iterators = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iterators,
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from this rank's vocab shard (collective over TP)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def forward_logits(chunks: Sequence[torch.nn.Module], tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [B, S, V] (float32) for a right-padded-free batch of tokens.

    Every rank passes the same ``tokens``; the result is returned on the last pipeline stage
    and ``None`` on the others. One sequence per micro-batch, so PP>1 really pipelines.
    """
    device = model_device()
    tokens = tokens.to(device)
    batch, seq = tokens.shape
    mask, pos = causal_mask(seq, device), positions(1, seq, device)
    microbatches = [{"tokens": tokens[i : i + 1], "position_ids": pos, "attention_mask": mask} for i in range(batch)]
    outs = run_forward_only(chunks, microbatches, lambda out, b: {"logits": gather_vocab(out).float()}, seq)
    if not outs:
        return None
    return torch.cat([o["logits"] for o in outs], dim=0)
