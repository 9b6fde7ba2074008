"""Score rollouts under two distributions and return per-position full-vocabulary statistics.

Two modes, one set of statistics (A is the first distribution, B the second):

* **views** (``score_views``): A = the student, B = the teacher, from ONE packed forward over
  student rows [prompt + response] and teacher rows [teacher prompt (with privileged context c) +
  the same response] -- the trainer's packing (``megatron_rlrt.packing``), so D_bar_t is measured
  exactly as the trainer sees it: same weights, same kernels, same forward.
* **policies** (``score_policies``): A = one policy, B = another (e.g. fine-tuned vs base), on the
  same rows; per pack, B's forward runs first and its log-probs stay on the last stage for A's.

At every response token t the statistics are taken over the FULL vocabulary, with the
tensor-parallel reductions done on vocabulary shards (nothing gathers [tokens, vocab]):

    logp_a, logp_b      log-prob of the sampled token y_t
    kl                  KL(A || B) = D_bar_t in views mode (paper eq. 3)
    js                  Jensen-Shannon divergence (natural log, <= ln 2)
    entropy_a/_b
    top_ids_a [T, K]    A's top-K ids, with log A and log B at them (top_a_logp_a, top_a_logp_b)
    top_ids_b [T, K]    B's top-K ids, with log A and log B at them
    max_diff_id/min_diff_id   argmax / argmin over v of log A(v) - log B(v) (= D_hat_t(v))

The hook is megatron-core's ``output_processor`` of ``GPTModel.forward`` (as in the trainer): it
receives the final hidden states and the LM-head shard, and only label positions reach the head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_rlrt.packing import PackedBatch, PackRow, pack_rows

_ROW_BLOCK = 256  # positions per block of [rows, V/TP] temporaries


@dataclass
class ScoreItem:
    """One rollout to score: ``prompt_ids + response_ids``; in views mode the teacher row is
    ``teacher_prompt_ids + response_ids`` (None: no teacher view, the item is skipped)."""

    key: int
    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    teacher_prompt_ids: Optional[Sequence[int]] = None


@dataclass
class PositionScores:
    """Per response token of one rollout (length T); float32/long tensors on the CPU."""

    token_ids: torch.Tensor
    logp_a: torch.Tensor
    logp_b: torch.Tensor
    kl: torch.Tensor
    js: torch.Tensor
    entropy_a: torch.Tensor
    entropy_b: torch.Tensor
    top_ids_a: torch.Tensor
    top_a_logp_a: torch.Tensor
    top_a_logp_b: torch.Tensor
    top_ids_b: torch.Tensor
    top_b_logp_a: torch.Tensor
    top_b_logp_b: torch.Tensor
    max_diff_id: torch.Tensor
    min_diff_id: torch.Tensor

    @property
    def d_hat(self) -> torch.Tensor:
        """log A(y_t) - log B(y_t): D_hat_t at the sampled token in views mode."""
        return self.logp_a - self.logp_b

    def __len__(self) -> int:
        return int(self.token_ids.numel())


FIELDS = ("logp_a", "logp_b", "kl", "js", "entropy_a", "entropy_b", "top_ids_a", "top_a_logp_a", "top_a_logp_b",
          "top_ids_b", "top_b_logp_a", "top_b_logp_b", "max_diff_id", "min_diff_id")


# --- full-vocabulary statistics over TP vocabulary shards ------------------------------------


def _tp():
    from megatron_rlrt.platform import setup_megatron

    setup_megatron()  # megatron-core imports only after the platform adaptation
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 1, 0
    size = ps.get_tensor_model_parallel_world_size()
    return (ps.get_tensor_model_parallel_group() if size > 1 else None), size, ps.get_tensor_model_parallel_rank()


def _allsum(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def _log_softmax(shard: torch.Tensor, group) -> torch.Tensor:
    """log-softmax over the full vocabulary of [n, V/TP] shard logits."""
    m = shard.max(dim=-1).values
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = _allsum(torch.exp(shard - m[:, None]).sum(-1), group)
    return shard - (m + s.log())[:, None]


def _global_topk(values: torch.Tensor, k: int, group, size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, global ids) [n, k] of the k largest entries over all shards (ties: lower id)."""
    shard = values.shape[-1]
    v, i = values.topk(min(k, shard), dim=-1)
    i = i + rank * shard
    if group is not None:
        vs, ids = [torch.empty_like(v) for _ in range(size)], [torch.empty_like(i) for _ in range(size)]
        dist.all_gather(vs, v.contiguous(), group=group)
        dist.all_gather(ids, i.contiguous(), group=group)
        v, i = torch.cat(vs, -1), torch.cat(ids, -1)
    best = v.topk(min(k, v.shape[-1]), dim=-1).indices
    return v.gather(1, best), i.gather(1, best)


def _at_ids(values: torch.Tensor, ids: torch.Tensor, group, rank: int) -> torch.Tensor:
    """values at global ids [n, k], from the shard that owns each id."""
    shard = values.shape[-1]
    local = ids - rank * shard
    inside = (local >= 0) & (local < shard)
    out = values.gather(1, local.clamp(0, shard - 1)) * inside
    return _allsum(out, group)


def pair_statistics(shard_a: torch.Tensor, shard_b: torch.Tensor, targets: torch.Tensor, k: int) -> dict:
    """Statistics of two distributions given as [n, V/TP] float32 logit shards (see the module
    docstring); collective over the tensor-parallel group. Returns a dict of [n] / [n, k] tensors."""
    group, size, rank = _tp()
    la, lb = _log_softmax(shard_a.float(), group), _log_softmax(shard_b.float(), group)
    pa, pb = la.exp(), lb.exp()
    log_m = torch.logaddexp(la, lb) - math.log(2.0)
    out = {
        "kl": _allsum((pa * (la - lb)).sum(-1), group),
        "js": 0.5 * _allsum((pa * (la - log_m)).sum(-1) + (pb * (lb - log_m)).sum(-1), group),
        "entropy_a": -_allsum((pa * la).sum(-1), group),
        "entropy_b": -_allsum((pb * lb).sum(-1), group),
        "logp_a": _at_ids(la, targets[:, None], group, rank)[:, 0],
        "logp_b": _at_ids(lb, targets[:, None], group, rank)[:, 0],
    }
    del pa, pb, log_m
    _, out["top_ids_a"] = _global_topk(la, k, group, size, rank)
    _, out["top_ids_b"] = _global_topk(lb, k, group, size, rank)
    out["top_a_logp_a"] = _at_ids(la, out["top_ids_a"], group, rank)
    out["top_a_logp_b"] = _at_ids(lb, out["top_ids_a"], group, rank)
    out["top_b_logp_a"] = _at_ids(la, out["top_ids_b"], group, rank)
    out["top_b_logp_b"] = _at_ids(lb, out["top_ids_b"], group, rank)
    diff = la - lb
    out["max_diff_id"] = _global_topk(diff, 1, group, size, rank)[1][:, 0]
    out["min_diff_id"] = _global_topk(-diff, 1, group, size, rank)[1][:, 0]
    return out


def _blocked_pair_statistics(logits_a, logits_b, targets, k, n: int) -> dict:
    """pair_statistics over ``n`` positions in blocks of _ROW_BLOCK rows; ``logits_a(sl)`` /
    ``logits_b(sl)`` give the [rows, V/TP] shard logits of a slice, so at most one block of
    vocabulary-wide temporaries exists at a time."""
    parts = [pair_statistics(logits_a(slice(s, s + _ROW_BLOCK)), logits_b(slice(s, s + _ROW_BLOCK)),
                             targets[s : s + _ROW_BLOCK], k) for s in range(0, n, _ROW_BLOCK)]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


# --- the packed forward ----------------------------------------------------------------------


@dataclass
class _Pack:
    packed: PackedBatch
    keys: list[int]
    a_pos: torch.Tensor  # packed positions scored as A (student / policy rows)
    b_pos: torch.Tensor  # matching positions scored as B (teacher rows; = a_pos in policies mode)
    lengths: list[int]  # response tokens per key, in order


@dataclass
class _Context:
    pack: _Pack
    mode: str  # "views" | "store_b" | "policies"
    topk: int
    stored_b: Optional[torch.Tensor] = None


def _make_pack(items: Sequence[ScoreItem], views: bool, pad_to_multiple_of: int) -> _Pack:
    rows = [PackRow(list(it.prompt_ids), list(it.response_ids), "student", it.key) for it in items]
    if views:
        rows += [PackRow(list(it.teacher_prompt_ids), list(it.response_ids), "teacher", it.key) for it in items]
    packed = pack_rows(rows, pad_to_multiple_of)
    a_pos, b_pos = [], []
    t_row = {int(s): i for i, s in enumerate(packed.teacher_sample_index.tolist())}
    for s_row, key in enumerate(packed.student_sample_index.tolist()):
        a = packed.student_index[s_row][packed.student_mask[s_row]]
        a_pos.append(a)
        if views:
            t = t_row[int(key)]
            b_pos.append(packed.teacher_index[t][packed.teacher_mask[t]])
    a_cat = torch.cat(a_pos) if a_pos else torch.zeros(0, dtype=torch.long)
    b_cat = torch.cat(b_pos) if views and b_pos else a_cat
    return _Pack(packed, [it.key for it in items], a_cat, b_cat, [len(it.response_ids) for it in items])


def plan_score_packs(items: Sequence[ScoreItem], views: bool, max_tokens: int) -> list[list[ScoreItem]]:
    """First-fit-decreasing packs of at most ``max_tokens`` tokens; an item (student row + its
    teacher row) is never split, and one larger than the budget gets a pack of its own."""
    def size(it):
        return len(it.prompt_ids) + len(it.response_ids) + (len(it.teacher_prompt_ids) + len(it.response_ids) if views else 0)

    packs: list[list[ScoreItem]] = []
    loads: list[int] = []
    for it in sorted(items, key=size, reverse=True):
        n = size(it)
        for i, load in enumerate(loads):
            if load + n <= max_tokens:
                packs[i].append(it)
                loads[i] += n
                break
        else:
            packs.append([it])
            loads.append(n)
    return packs


def _output_processor(*, hidden_states, output_layer, output_weight, context: _Context, config, **_):
    """megatron GPTModel hook: per-position statistics at the pack's response positions."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    hidden = hidden_states
    if config.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden)
    hidden = hidden[:, 0, :]
    weight = output_weight if output_weight is not None else output_layer.weight
    pack = context.pack
    device = hidden.device

    def shard_logits(pos):
        return (hidden[pos.to(device)] @ weight.t()).float()

    if context.mode == "store_b":  # policies mode: B's logits wait for A's pass ([n, V/TP] per pack)
        return shard_logits(pack.b_pos)
    targets = pack.packed.labels[0, pack.a_pos].to(device)
    if context.mode == "views":
        b_logits = lambda sl: shard_logits(pack.b_pos[sl])
    else:
        b_logits = lambda sl: context.stored_b[sl].to(device)
    stats = _blocked_pair_statistics(lambda sl: shard_logits(pack.a_pos[sl]), b_logits, targets, context.topk,
                                     len(pack.a_pos))
    stats["token_ids"] = targets
    return stats


def _model_inputs(packed: PackedBatch, device) -> dict:
    """Packed (THD) inputs as the trainer passes them: row boundaries in ``cu_seqlens``, no
    [N, N] mask (Transformer Engine on a GPU, the local spec's PackedCoreAttention on a CPU)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = packed.cu_seqlens.to(device)
    return dict(input_ids=packed.tokens.to(device), position_ids=packed.position_ids.to(device), attention_mask=None,
                packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                  max_seqlen_q=packed.max_seqlen, max_seqlen_kv=packed.max_seqlen))


def _forward(chunks, ctx: _Context):
    """One pack through megatron's schedule (``models.forward.run_schedule``, no grad); the hook's
    output on the last stage, else None."""
    from megatron_rlrt.models.forward import run_schedule
    from megatron_rlrt.platform import current_device

    device = current_device()
    inputs = _model_inputs(ctx.pack.packed, device)

    def forward(model, _pack):
        return model(**inputs, output_processor=_output_processor, output_processor_context=ctx)

    def loss_fn(_pack, stats):  # the schedule hands the hook's dict to loss_fn; it comes back as the report
        return torch.zeros((), device=device), stats

    with torch.no_grad():
        reports = run_schedule(chunks, [ctx.pack], forward, loss_fn, ctx.pack.packed.num_tokens, forward_only=True)
    return reports[0] if reports else None


def _split(pack: _Pack, stats: dict) -> dict[int, PositionScores]:
    out, start = {}, 0
    for key, n in zip(pack.keys, pack.lengths):
        part = {name: stats[name][start : start + n].detach().cpu() for name in ("token_ids",) + FIELDS}
        out[key] = PositionScores(**part)
        start += n
    return out


@dataclass
class ScoreOptions:
    topk: int = 100  # the paper's candidate sets: union of both top-100
    max_tokens_per_pack: int = 8192
    pad_to_multiple_of: int = 1
    progress: Optional[Callable[[int], None]] = None  # called with the number of items done per pack


def score_views(chunks, items: Sequence[ScoreItem], opts: ScoreOptions = ScoreOptions()) -> dict[int, PositionScores]:
    """A = student, B = teacher, from one packed forward per pack (collective; every rank calls it
    with the same items). Items without a teacher prompt are skipped. Result on the last pipeline
    stage ({} elsewhere)."""
    items = [it for it in items if it.teacher_prompt_ids is not None and len(it.response_ids)]
    out: dict[int, PositionScores] = {}
    for group in plan_score_packs(items, True, opts.max_tokens_per_pack):
        pack = _make_pack(group, True, opts.pad_to_multiple_of)
        stats = _forward(chunks, _Context(pack, "views", opts.topk))
        if stats is not None:
            out.update(_split(pack, stats))
        if opts.progress:
            opts.progress(len(group))
    return out


def score_policies(chunks_a, chunks_b, items: Sequence[ScoreItem],
                   opts: ScoreOptions = ScoreOptions()) -> dict[int, PositionScores]:
    """A = ``chunks_a``'s policy, B = ``chunks_b``'s, on the same rows (``prompt_ids + response_ids``).
    Per pack, B's shard logits at the response positions stay on the last stage for A's pass."""
    items = [it for it in items if len(it.response_ids)]
    out: dict[int, PositionScores] = {}
    for group in plan_score_packs(items, False, opts.max_tokens_per_pack):
        pack = _make_pack(group, False, opts.pad_to_multiple_of)
        stored = _forward(chunks_b, _Context(pack, "store_b", opts.topk))
        stats = _forward(chunks_a, _Context(pack, "policies", opts.topk, stored))
        if stats is not None:
            out.update(_split(pack, stats))
        if opts.progress:
            opts.progress(len(group))
    return out


def to_record(s: PositionScores, fields: Sequence[str] = ("token_ids",) + FIELDS) -> dict:
    """Plain lists (for json / torch.save across processes)."""
    return {f: getattr(s, f).tolist() for f in fields}


def from_record(rec: dict) -> PositionScores:
    longs = {"token_ids", "top_ids_a", "top_ids_b", "max_diff_id", "min_diff_id"}
    return PositionScores(**{f: torch.tensor(rec[f], dtype=torch.long if f in longs else torch.float32)
                             for f in ("token_ids",) + FIELDS})
