"""Forward passes through megatron's pipeline schedules.

Everything that runs the Megatron model (tools, tests, trainer) goes through ``run_schedule``,
the one wrapper around ``get_forward_backward_func()``, so that PP/VPP take megatron's own
path. Also here: masks/positions for a batch, and a forward that returns full-vocabulary
logits (for parity checks and small evaluations; training never gathers the vocabulary).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_rlrt.platform import current_device


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """Megatron's mask convention: bool [1, 1, s, s], True where attention is NOT allowed."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def positions(batch: int, seq_len: int, device=None) -> torch.Tensor:
    return torch.arange(seq_len, device=device).unsqueeze(0).expand(batch, -1)


def run_schedule(
    chunks: Sequence[torch.nn.Module],
    microbatches: Sequence,
    forward: Callable[[torch.nn.Module, object], torch.Tensor],
    loss_fn: Callable[[object, torch.Tensor], tuple],
    seq_length: int,
    forward_only: bool,
) -> list:
    """megatron's ``get_forward_backward_func()`` over ``microbatches`` (the one wrapper every
    caller uses, so that no-pipeline, 1F1B and interleaved schedules all take megatron's own path).

    ``forward(model_chunk, mb)`` runs the chunk; ``loss_fn(mb, output)`` runs on the last
    pipeline stage and returns megatron's ``(loss, [num_tokens,] report)``; the reports come
    back as a list (empty on other stages). Each micro-batch is one packed sequence.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, model):
        mb = next(data_iterator)
        return forward(model, mb), lambda output: loss_fn(mb, output)

    chunks = list(chunks)
    data = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=data, model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=1, forward_only=forward_only,
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
    device = current_device()
    tokens = tokens.to(device)
    batch, seq = tokens.shape
    mask, pos = causal_mask(seq, device), positions(1, seq, device)
    microbatches = [{"tokens": tokens[i : i + 1], "position_ids": pos, "attention_mask": mask} for i in range(batch)]
    with torch.no_grad():
        outs = run_schedule(chunks, microbatches, lambda model, b: model(b["tokens"], b["position_ids"], b["attention_mask"]),
                            lambda b, out: (torch.zeros((), device=out.device), {"logits": gather_vocab(out).float()}),
                            seq, forward_only=True)
    if not outs:
        return None
    return torch.cat([o["logits"] for o in outs], dim=0)
