"""Packed (THD) batches holding student rows and their teacher rows for one forward.

A row is prompt ids + response ids: a student row is the student prompt + the rollout; a
teacher row is the teacher prompt (with privileged context) + the SAME response ids. Rows are
concatenated into one sequence [1, N] with position ids restarting at 0 per row; attention is
block-diagonal causal (``cu_seqlens`` for THD/flash attention, ``attention_mask()`` for the
local CPU attention).

Per-position convention: a per-position value x[i] refers to the NEXT token, e.g.
x[i] = log p(tokens[i+1] | tokens[:i+1]) (logits at i scored against ``labels[i]``). Response
token j of a row starting at s with prompt length P is therefore read at s + P - 1 + j.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

ROLES = ("student", "teacher")


@dataclass(frozen=True)
class PackRow:
    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    role: str = "student"
    sample_index: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown row role {self.role!r}; valid: {list(ROLES)}")
        if len(self.prompt_ids) == 0:
            raise ValueError("a row needs at least one prompt token (the first response token is predicted from it)")

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class PackedBatch:
    """One packed sequence and the maps back to per-row response tokens.

    ``student_index`` [B, T] / ``teacher_index`` [B_t, T] hold the packed position that predicts
    response token t of each student / teacher row (0 where ``*_mask`` is False);
    ``*_sample_index`` says which sample each row belongs to. Rows keep their pack order.
    """

    tokens: torch.Tensor  # long [1, N]
    position_ids: torch.Tensor  # long [1, N]
    labels: torch.Tensor  # long [1, N]: tokens[i + 1] within the row, 0 elsewhere
    label_mask: torch.Tensor  # bool [1, N]: True where labels[i] is a response token
    cu_seqlens: torch.Tensor  # int32 [segments + 1] (trailing padding is its own segment)
    max_seqlen: int
    row_roles: list[str]
    row_sample_index: list[int]
    student_index: torch.Tensor
    student_mask: torch.Tensor
    student_sample_index: torch.Tensor
    teacher_index: torch.Tensor
    teacher_mask: torch.Tensor
    teacher_sample_index: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy with every tensor on ``device``."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return PackedBatch(**moved)

    def attention_mask(self) -> torch.Tensor:
        """bool [1, 1, N, N] in Megatron's convention: True = masked OUT. Key j is visible to
        query i iff both lie in the same segment and j <= i. Built on request (O(N^2))."""
        seg = _segment_ids(self.cu_seqlens, self.num_tokens)
        pos = torch.arange(self.num_tokens, device=seg.device)
        visible = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
        return ~visible[None, None]

    def gather_student(self, per_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T, ...], mask [B, T]) response-token values of the student rows, 0-padded."""
        return _gather(per_position, self.student_index, self.student_mask, self.num_tokens)

    def gather_teacher(self, per_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B_t, T, ...], mask [B_t, T]) response-token values of the teacher rows, 0-padded."""
        return _gather(per_position, self.teacher_index, self.teacher_mask, self.num_tokens)


def pad_multiple(*factors: int) -> int:
    """One packed-length multiple satisfying every requirement (sequence parallelism, context
    parallelism, FP8 GEMM alignment, ...): their least common multiple; ``pack_rows`` pads to it.
    E.g. ``pad_multiple(tp, precision.fp8_pad_multiple(opts, shards))``."""
    return functools.reduce(math.lcm, (max(1, int(f)) for f in factors), 1)


def pack_rows(rows: Sequence[PackRow], pad_to_multiple_of: int = 1, pad_token_id: int = 0,
              segment_multiple: int = 1) -> PackedBatch:
    """Pack ``rows`` in the given order. ``pad_to_multiple_of`` appends a padding segment
    (e.g. for sequence parallelism), excluded from every label and index map.

    ``segment_multiple`` (2 x context-parallel size): each row is padded AT ITS END to a multiple
    of it, inside its own segment (causal attention: the padding never affects the row's real
    tokens), so every segment splits into 2 x CP equal chunks; the total is then padded to a
    multiple of lcm(pad_to_multiple_of, segment_multiple)."""
    if not rows:
        raise ValueError("cannot pack zero rows")
    if segment_multiple < 1 or pad_to_multiple_of < 1:
        raise ValueError(f"need segment_multiple >= 1 and pad_to_multiple_of >= 1, got {segment_multiple}, "
                         f"{pad_to_multiple_of}")
    pad_to_multiple_of = math.lcm(pad_to_multiple_of, segment_multiple)
    tokens: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    label_mask: list[bool] = []
    cu = [0]
    index = {role: [] for role in ROLES}
    sample = {role: [] for role in ROLES}
    for row in rows:
        start, prompt_len, n = len(tokens), len(row.prompt_ids), len(row)
        ids = list(row.prompt_ids) + list(row.response_ids)
        tokens += ids
        positions += range(n)
        labels += ids[1:] + [0]
        label_mask += [False] * (prompt_len - 1) + [True] * len(row.response_ids) + [False]
        fill = (-n) % segment_multiple
        if fill:  # in-row padding: positions continue, nothing is scored
            tokens += [pad_token_id] * fill
            positions += range(n, n + fill)
            labels += [0] * fill
            label_mask += [False] * fill
        cu.append(len(tokens))
        index[row.role].append(range(start + prompt_len - 1, start + n - 1))
        sample[row.role].append(row.sample_index)
    pad = (-len(tokens)) % pad_to_multiple_of
    if pad:
        tokens += [pad_token_id] * pad
        positions += range(pad)
        labels += [0] * pad
        label_mask += [False] * pad
        cu.append(len(tokens))
    width = max((len(r) for r in index["student"] + index["teacher"]), default=0)
    s_index, s_mask = _index_matrix(index["student"], width)
    t_index, t_mask = _index_matrix(index["teacher"], width)
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    return PackedBatch(
        tokens=torch.tensor([tokens], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        labels=torch.tensor([labels], dtype=torch.long),
        label_mask=torch.tensor([label_mask], dtype=torch.bool),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(lengths),
        row_roles=[r.role for r in rows],
        row_sample_index=[r.sample_index for r in rows],
        student_index=s_index,
        student_mask=s_mask,
        student_sample_index=torch.tensor(sample["student"], dtype=torch.long),
        teacher_index=t_index,
        teacher_mask=t_mask,
        teacher_sample_index=torch.tensor(sample["teacher"], dtype=torch.long),
    )


def plan_packs(rows: Sequence[PackRow], max_tokens_per_pack: int, num_ranks: int = 1) -> list[list[list[int]]]:
    """Row indices per rank, per pack: ``plan[rank][pack] = [row, ...]``.

    1. A sample's student and teacher rows form one unit, so they normally share a rank and
       a pack (teacher and student then come from the same forward).
    2. Units go to ranks longest-first, each to the rank with the fewest tokens so far
       (greedy LPT, within 4/3 of the optimal max load; ties: lowest rank).
    3. On each rank, units are packed first-fit-decreasing into packs of at most
       ``max_tokens_per_pack`` tokens; a unit larger than that is split into its rows.
    Correctness never depends on 1: ``PackedBatch`` maps every row on its own.
    """
    if max_tokens_per_pack <= 0 or num_ranks <= 0:
        raise ValueError(f"need max_tokens_per_pack > 0 and num_ranks > 0, got {max_tokens_per_pack}, {num_ranks}")
    too_long = [i for i, r in enumerate(rows) if len(r) > max_tokens_per_pack]
    if too_long:
        i = too_long[0]
        raise ValueError(f"row {i} has {len(rows[i])} tokens > max_tokens_per_pack {max_tokens_per_pack}")
    units: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        units.setdefault(row.sample_index, []).append(i)
    ordered = sorted(units.values(), key=lambda u: (-sum(len(rows[i]) for i in u), u[0]))

    loads = [0] * num_ranks
    per_rank: list[list[list[int]]] = [[] for _ in range(num_ranks)]
    for unit in ordered:
        rank = min(range(num_ranks), key=lambda k: (loads[k], k))
        loads[rank] += sum(len(rows[i]) for i in unit)
        per_rank[rank].append(unit)

    plan = []
    for rank_units in per_rank:
        items: list[list[int]] = []
        for unit in rank_units:
            fits = sum(len(rows[i]) for i in unit) <= max_tokens_per_pack
            items += [unit] if fits else [[i] for i in unit]
        plan.append(_first_fit_decreasing(items, [sum(len(rows[i]) for i in it) for it in items], max_tokens_per_pack))
    return plan


def zigzag_chunks(length: int, cp_size: int, cp_rank: int) -> list[tuple[int, int]]:
    """(start within the row, size) of the chunks of one packed row that context-parallel rank
    ``cp_rank`` holds, in local order: the row is cut into 2 x CP equal chunks and rank i keeps
    chunks i and 2*CP-1-i (megatron-core / TE / slime's split; it balances causal work)."""
    if cp_size == 1:
        return [(0, length)]
    if length % (2 * cp_size):
        raise ValueError(f"a packed row of {length} tokens is not a multiple of 2 x context-parallel size "
                         f"{2 * cp_size}; pack with segment_multiple=2*CP")
    c = length // (2 * cp_size)
    return [(cp_rank * c, c), ((2 * cp_size - 1 - cp_rank) * c, c)]


def zigzag_index(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Packed positions held by ``cp_rank``, in its local order (row by row, two chunks each):
    ``tokens[:, zigzag_index(...)]`` is that rank's input. ``cu_seqlens`` are the FULL lengths."""
    bounds = cu_seqlens.tolist()
    parts = [torch.arange(start + a, start + a + size)
             for start, end in zip(bounds[:-1], bounds[1:]) for a, size in zigzag_chunks(end - start, cp_size, cp_rank)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _first_fit_decreasing(items: list[list[int]], sizes: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    free: list[int] = []
    for k in sorted(range(len(items)), key=lambda k: (-sizes[k], items[k][0])):
        target = next((b for b in range(len(bins)) if free[b] >= sizes[k]), None)
        if target is None:
            bins.append([])
            free.append(capacity)
            target = len(bins) - 1
        bins[target] += items[k]
        free[target] -= sizes[k]
    return bins


def _index_matrix(ranges: list[range], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.zeros((len(ranges), width), dtype=torch.long)
    mask = torch.zeros((len(ranges), width), dtype=torch.bool)
    for r, positions in enumerate(ranges):
        index[r, : len(positions)] = torch.tensor(list(positions), dtype=torch.long)
        mask[r, : len(positions)] = True
    return index, mask


def _segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segments = torch.arange(len(lengths), device=cu_seqlens.device)
    return torch.repeat_interleave(segments, lengths, output_size=num_tokens)


def _gather(
    per_position: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values[index] with trailing dims kept and 0 where mask is False, mask), on the values'
    device; accepts [N, ...] or [1, N, ...]."""
    values = per_position
    if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == num_tokens:
        values = values[0]
    if values.shape[0] != num_tokens:
        raise ValueError(f"per-position values have shape {tuple(per_position.shape)}; expected [N, ...] or "
                         f"[1, N, ...] with N = {num_tokens}")
    index, mask = index.to(values.device), mask.to(values.device)
    out = values[index]
    keep = mask.view(mask.shape + (1,) * (out.dim() - 2))
    return torch.where(keep, out, torch.zeros_like(out)), mask
