"""Log-probs from the last pipeline stage, without full-sequence logits.

The trainer hands megatron's ``GPTModel.forward`` an ``output_processor`` (a megatron-core
hook that replaces the output layer): it keeps only the positions that predict response
tokens, multiplies those hidden states with this rank's vocab shard of the LM head and returns
per-position columns [log p(label), entropy?, top-K log-probs?] computed over the FULL
vocabulary with tensor-parallel reductions. Prompt positions never reach the LM head.

Log-probs and entropy of the sampled tokens come from ``megatron_rlrt.ops`` (one collective,
C++/CUDA kernels) through the fused-linear op on every device, CPU included, so [tokens, vocab]
logits never exist (the issue's 8k-token CPU measurement spent most of its +19 GB on them).
Distillation's top-K needs this rank's logit shard and materialises it (``ops/vocab_topk.py``:
the full-vocabulary log-sum-exp, global top-K ids, logits at global ids). This module decides
what to compute and lays out the columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogprobRequest:
    """What the output processor computes for one micro-batch.

    positions: packed positions (index into the sequence) whose next token is scored.
    targets: the token at each of those positions + 1 (global vocab ids).
    topk_ids: optional [n, K] global ids at which to also return log-probs (distillation);
        ``topk`` > 0 with ``topk_ids`` None means "return the top-K ids of this distribution".
    """

    positions: torch.Tensor
    targets: torch.Tensor
    temperature: float = 1.0
    with_entropy: bool = False
    topk: int = 0
    topk_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class ColumnLayout:
    """Where each value sits in the [n, C] columns ``logprob_columns`` returns (the one place
    that knows; every decode site reads through it):

        [log p(target)] [entropy]? [K top-K log-probs]? [K top-K ids (as floats)]?

    The ids are only returned when the request chose them (``topk`` > 0, ``topk_ids`` None).
    """

    with_entropy: bool = False
    topk: int = 0
    with_topk_ids: bool = False

    @classmethod
    def of(cls, req: LogprobRequest) -> "ColumnLayout":
        return cls(req.with_entropy, req.topk, bool(req.topk) and req.topk_ids is None)

    @property
    def logprob(self) -> int:
        return 0

    @property
    def entropy(self) -> int | None:
        return 1 if self.with_entropy else None

    @property
    def topk_logprobs(self) -> slice:
        start = 1 + int(self.with_entropy)
        return slice(start, start + self.topk)

    @property
    def topk_ids(self) -> slice:
        start = 1 + int(self.with_entropy) + self.topk
        return slice(start, start + (self.topk if self.with_topk_ids else 0))

    @property
    def width(self) -> int:
        return 1 + int(self.with_entropy) + self.topk * (1 + int(self.with_topk_ids))


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


# logit tiles of the fused-linear op hold at most this many elements ([tokens, vocab columns])
FUSED_TILE_ELEMENTS = 1 << 24


def fused_chunk_size(num_tokens: int) -> int:
    """Vocabulary columns per tile: 4096, fewer for long inputs so one tile stays ~64 MB in fp32
    (memory linear in tokens, independent of the vocabulary)."""
    return max(128, min(4096, FUSED_TILE_ELEMENTS // max(1, num_tokens)))


def logprob_columns(hidden: torch.Tensor, weight: torch.Tensor, req: LogprobRequest,
                    sequence_parallel: bool = False) -> torch.Tensor:
    """[n, C] float32 in ``ColumnLayout.of(req)``: log p(target); entropy if asked; K top-K
    log-probs and, when the ids were not given, K ids (as floats, exact below 2^24) of the top-K.

    Without top-K (every RL method but distillation) this is the fused-linear op on every device:
    no [n, V/TP] logits exist in the no-grad pass nor in the training pass (its backward
    recomputes the tiles). ``sequence_parallel``: ``hidden`` was all-gathered by the caller, whose
    backward reduce-scatters its gradient over TP (so it is not all-reduced here as well)."""
    from megatron_rlrt import ops

    group, tp_size, tp_rank = _tp()
    tp_group = group if tp_size > 1 else None
    if not req.topk:
        logp, entropy = ops.fused_linear_logprobs(hidden, weight, req.targets, req.temperature, tp_group,
                                                  with_entropy=req.with_entropy,
                                                  chunk_size=fused_chunk_size(hidden.shape[0]),
                                                  reduce_hidden_grad=not sequence_parallel)
        return torch.stack([logp, entropy] if req.with_entropy else [logp], dim=1)
    raw = ops.shard_logits(hidden, weight, 1.0, sequence_parallel)
    logp, entropy = ops.vocab_parallel_logprobs(raw, req.targets, req.temperature, tp_group,
                                                with_entropy=req.with_entropy)
    cols = [logp] + ([entropy] if req.with_entropy else [])
    if req.topk:
        logits = raw / req.temperature
        lse, _, _ = ops.vocab_parallel_lse(logits, group, tp_size)
        ids = req.topk_ids if req.topk_ids is not None else ops.global_topk_ids(logits.detach(), req.topk, tp_size,
                                                                                  tp_rank, group)
        cols.extend((ops.gather_at_global_ids(logits, ids, tp_size, tp_rank) - lse[:, None]).clamp(max=0.0).unbind(1))
        if req.topk_ids is None:
            cols.extend(ids.float().unbind(1))
    return torch.stack(cols, dim=1)
