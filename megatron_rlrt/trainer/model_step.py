"""The two kinds of pass the RL step makes through megatron's pipeline schedules.

``collect`` (no grad): ONE packed forward over student rows [prompt + response] and teacher
rows [teacher prompt + the same response] gives log P_S(y_t) (the old policy for PPO) and
log P_T(y_t) from the same weights, kernels and precision -- the small difference D_t that
RLRT amplifies is never a difference between two engines.

``train``: micro-batches of student rows, forward + backward with the method's loss; the
loss is returned as a SUM with its normaliser count and megatron (calculate_per_token_loss)
divides the gradients by the count summed over micro-batches and data-parallel ranks, so
token-mean is over the whole optimizer mini-batch.

Both run megatron's schedules through ``models.forward.run_schedule``: no pipeline, 1F1B or
interleaved, as configured.

Context parallelism: each CP rank feeds the model its zigzag share of every micro-batch and the
per-token columns are all-gathered back (``trainer/context_parallel.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from megatron_rlrt.models.forward import run_schedule
from megatron_rlrt.packing import PackedBatch, PackRow, pack_rows, plan_packs
from megatron_rlrt.platform import current_device
from megatron_rlrt.trainer.context_parallel import (CpSplit, cp_size_rank, gather_columns_over_cp,
                                                   report_on_cp_rank0, split_for_cp)
from megatron_rlrt.trainer.logprobs import ColumnLayout, LogprobRequest, logprob_columns
from megatron_rlrt.trainer.rollout_batch import Sample

if TYPE_CHECKING:
    from megatron_rlrt.trainer.weight_snapshot import WeightSnapshot


@dataclass
class MicroBatch:
    packed: PackedBatch
    request: LogprobRequest
    # distillation: for each label position, the label position of the same response token in
    # the sample's student row (whose top-K ids the teacher is read at); -1 for student rows.
    # Indexes all label positions (output columns), also with CP.
    teacher_src: torch.Tensor | None = None
    # the packed position of every output column, in column order (all label positions, sorted)
    label_positions: torch.Tensor | None = None
    cp: CpSplit | None = None  # context parallelism: this rank's share and the gather map


@dataclass(frozen=True)
class StepOptions:
    temperature: float = 1.0
    with_entropy: bool = False
    topk: int = 0  # distillation top-K (0: off)
    use_te: bool = False  # Transformer Engine layers (GPU); packed rows go as THD either way
    pad_to_multiple_of: int = 1  # whole packed length (sequence parallelism, FP8 alignment)
    sequence_parallel_size: int = 1  # TP size when sequence parallel (multiplies the per-row CP padding)
    logprob_precision: str = "train"  # no-grad passes: "train" (same kernels as training) or "bf16" (FP8 off)


def _rows(samples: Sequence[Sample], with_teachers: bool) -> list[PackRow]:
    rows = [PackRow(s.prompt_ids, s.response_ids, "student", s.index) for s in samples]
    if with_teachers:
        rows += [PackRow(s.teacher_prompt_ids, s.response_ids, "teacher", s.index) for s in samples if s.has_teacher]
    return rows


def plan_microbatches(samples: Sequence[Sample], with_teachers: bool, micro_batch_size: int,
                      max_tokens: int | None, cp_size: int = 1) -> list[list[PackRow]]:
    """Rows per micro-batch: by token budget (dynamic) or ``micro_batch_size`` samples each
    (a sample's teacher row always travels with it).

    With a budget, a micro-batch holds at most ``max_tokens x cp_size`` tokens (each GPU of the CP
    group holds 1/CP of them, slime's rule); a sample whose rows do not fit together is split into
    its rows, and a row longer than the budget gets a micro-batch of its own -- never truncated,
    never an error. The plan is a pure function of the samples, so every pipeline stage (same
    samples) gets the same number of micro-batches (run_pipeline checks it)."""
    rows = _rows(samples, with_teachers)
    if max_tokens is not None:
        capacity = max_tokens * cp_size
        alone = [i for i, r in enumerate(rows) if len(r) > capacity]
        rest = [i for i in range(len(rows)) if len(rows[i]) <= capacity]
        plan = [[rows[i]] for i in alone]
        if rest:
            packs = plan_packs([rows[i] for i in rest], capacity, 1)[0]
            plan += [[rows[rest[j]] for j in pack] for pack in packs]
        return plan
    by_sample: dict[int, list[PackRow]] = {}
    for r in rows:
        by_sample.setdefault(r.sample_index, []).append(r)
    order = [s.index for s in samples]
    return [[r for i in order[k : k + micro_batch_size] for r in by_sample[i]]
            for k in range(0, len(order), micro_batch_size)]


def build_microbatch(rows: list[PackRow], opts: StepOptions, topk_ids: dict[int, torch.Tensor] | None = None
                     ) -> MicroBatch:
    """Pack rows; request log-probs at every position that predicts a response token (with CP:
    the positions this rank holds, ``context_parallel.split_for_cp``)."""
    cp_size, cp_rank = cp_size_rank()
    segment = 2 * cp_size * opts.sequence_parallel_size if cp_size > 1 else 1
    packed = pack_rows(rows, opts.pad_to_multiple_of, segment_multiple=segment)
    positions = packed.label_mask[0].nonzero()[:, 0]
    targets = packed.labels[0, positions]
    ids = None
    if topk_ids is not None:  # training pass of a distillation method: the ids chosen in collect
        full = torch.zeros((packed.num_tokens, opts.topk), dtype=torch.long)
        for row, sample in enumerate(packed.student_sample_index.tolist()):
            idx = packed.student_index[row][packed.student_mask[row]]
            full[idx] = topk_ids[sample][: len(idx)]
        ids = full[positions]
    split = None
    request_positions = positions
    if cp_size > 1:
        request_positions, split = split_for_cp(packed, positions, cp_size, cp_rank)
        targets = targets[split.slots]
        if ids is not None:  # the top-K ids of this rank's rows (chosen in collect over whole rows)
            ids = ids[split.slots]
    request = LogprobRequest(request_positions, targets, opts.temperature, opts.with_entropy, opts.topk, ids)
    teacher_src = None
    if opts.topk and topk_ids is None and packed.teacher_index.numel():
        teacher_src = _teacher_sources(packed, positions)
    return MicroBatch(packed, request, teacher_src, positions, split)


def _teacher_sources(packed: PackedBatch, positions: torch.Tensor) -> torch.Tensor:
    """Index (into ``positions``) of the student label position matching each teacher one."""
    where = torch.full((packed.num_tokens,), -1, dtype=torch.long)
    where[positions] = torch.arange(len(positions))
    src = torch.full((len(positions),), -1, dtype=torch.long)
    student_row = {int(s): i for i, s in enumerate(packed.student_sample_index.tolist())}
    for t_row, sample in enumerate(packed.teacher_sample_index.tolist()):
        if sample not in student_row:
            raise ValueError(f"sample {sample}: teacher row packed without its student row")
        s_row = student_row[sample]
        m = packed.teacher_mask[t_row]
        src[where[packed.teacher_index[t_row][m]]] = where[packed.student_index[s_row][m]]
    return src


def output_processor(*, hidden_states, output_layer, output_weight, context: MicroBatch, config, **_):
    """megatron GPTModel hook replacing the LM head: log-prob columns at response positions."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    hidden = hidden_states
    if config.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden)
    hidden = hidden[:, 0, :]  # [N, H]: packed batches have batch size 1
    weight = output_weight if output_weight is not None else output_layer.weight
    req = context.request
    selected = hidden[req.positions]
    cols = logprob_columns(selected, weight, req, config.sequence_parallel)
    if context.teacher_src is not None:
        # teacher rows are scored at the top-K ids of the matching student position; with CP that
        # position may sit on another CP rank: read the ids from the gathered columns (no-grad pass)
        layout = ColumnLayout.of(req)
        if context.cp is None:
            src, all_cols = context.teacher_src, cols
        else:
            src = context.teacher_src[context.cp.slots.to(cols.device)]
            all_cols = gather_columns_over_cp(cols, context.cp)
        is_teacher = src >= 0
        t_ids = all_cols[src[is_teacher], layout.topk_ids].long()
        t_req = LogprobRequest(req.positions[is_teacher], req.targets[is_teacher], req.temperature,
                               req.with_entropy, req.topk, t_ids)
        t_cols = logprob_columns(selected[is_teacher], weight, t_req, config.sequence_parallel)
        cols = cols.clone()
        cols[is_teacher, : t_cols.shape[1]] = t_cols
        cols[is_teacher, layout.topk_ids] = t_ids.float()
    if context.cp is not None:
        cols = gather_columns_over_cp(cols, context.cp)
    return cols


def model_inputs(mb: MicroBatch, opts: StepOptions, device: torch.device) -> dict:
    """Packed (THD) inputs: row boundaries as ``cu_seqlens``, no [N, N] mask. TE's attention
    (GPU) and the local spec's PackedCoreAttention (CPU) both read them."""
    from megatron.core.packed_seq_params import PackedSeqParams

    packed = mb.packed
    cu = packed.cu_seqlens.to(device)
    tokens, pos = packed.tokens, packed.position_ids
    if mb.cp is not None:  # this rank's zigzag share; cu_seqlens stay the full lengths
        tokens, pos = tokens[:, mb.cp.local_index], pos[:, mb.cp.local_index]
    return dict(
        input_ids=tokens.to(device), position_ids=pos.to(device), attention_mask=None,
        packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                          max_seqlen_q=packed.max_seqlen, max_seqlen_kv=packed.max_seqlen),
    )


def run_pipeline(chunks, microbatches: list[MicroBatch], opts: StepOptions, loss_fn: Callable,
                 forward_only: bool) -> list:
    """megatron's schedule over ``microbatches``; ``loss_fn(mb, columns)`` runs on the last stage."""
    device = current_device()

    def forward(model, mb: MicroBatch) -> torch.Tensor:
        request = LogprobRequest(mb.request.positions.to(device), mb.request.targets.to(device),
                                 mb.request.temperature, mb.request.with_entropy, mb.request.topk,
                                 None if mb.request.topk_ids is None else mb.request.topk_ids.to(device))
        ctx = MicroBatch(mb.packed, request, None if mb.teacher_src is None else mb.teacher_src.to(device),
                         mb.label_positions, mb.cp)
        return model(**model_inputs(mb, opts, device), output_processor=output_processor,
                     output_processor_context=ctx)

    _check_stages_agree(len(microbatches))
    cp_size, _ = cp_size_rank()
    longest = max(mb.packed.num_tokens for mb in microbatches) // cp_size
    return run_schedule(chunks, microbatches, forward, loss_fn, longest, forward_only)


def _check_stages_agree(num_microbatches: int) -> None:
    """Pipeline stages exchange one activation per micro-batch: a different count would hang."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return
    n = torch.tensor([num_microbatches, -num_microbatches], dtype=torch.long, device=current_device())
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
    if int(n[0]) != num_microbatches or int(-n[1]) != num_microbatches:
        raise RuntimeError(f"pipeline stages planned different micro-batch counts ({int(-n[1])}..{int(n[0])}); "
                           "every stage must see the same samples")


# --- collect: old-policy and teacher log-probs -------------------------------------------------


@dataclass
class Collected:
    """Per sample (keyed by Sample.index), on the last pipeline stage only."""

    student_logprobs: dict[int, torch.Tensor]
    teacher_logprobs: dict[int, torch.Tensor]
    student_topk_ids: dict[int, torch.Tensor]
    teacher_topk_logprobs: dict[int, torch.Tensor]
    ref_logprobs: dict[int, torch.Tensor] | None = None  # reference policy (--kl-coef > 0)
    # with collect(topk_ids=...): the student rows' log-probs at those given ids
    student_topk_logprobs: dict[int, torch.Tensor] | None = None


def collect(chunks, samples: Sequence[Sample], opts: StepOptions, micro_batch_size: int,
            max_tokens: int | None, topk_ids: dict[int, torch.Tensor] | None = None) -> Collected:
    """One no-grad packed pass over student + teacher rows (see the module docstring).

    ``topk_ids`` ({sample: [T, K] vocabulary ids}, with ``opts.topk``): score the student rows at
    these ids instead of their own top-K, into ``student_topk_logprobs`` -- how a teacher with
    other weights (a separate pass over teacher prompts) is scored at the policy's top-K.
    """
    mbs = [build_microbatch(rows, opts, topk_ids) for rows in
           plan_microbatches(samples, True, micro_batch_size, max_tokens, cp_size_rank()[0])]
    out = Collected({}, {}, {}, {}, student_topk_logprobs={} if topk_ids is not None else None)
    k = opts.topk
    layout = ColumnLayout(opts.with_entropy, k, with_topk_ids=bool(k) and topk_ids is None)

    def store(mb: MicroBatch, cols: torch.Tensor):
        full = cols.new_zeros((mb.packed.num_tokens, cols.shape[1]))
        full[mb.label_positions.to(cols.device)] = cols.detach()
        for role, gather, sample_index in (("student", mb.packed.gather_student, mb.packed.student_sample_index),
                                           ("teacher", mb.packed.gather_teacher, mb.packed.teacher_sample_index)):
            values, mask = gather(full)
            # one device->host copy per role and micro-batch (not one sync per row on a GPU)
            values, lengths = values.float().cpu(), mask.sum(1).tolist()
            for row, sample in enumerate(sample_index.tolist()):
                n = int(lengths[row])
                v = values[row, :n]
                if role == "student":
                    out.student_logprobs[sample] = v[:, layout.logprob]
                    if k and topk_ids is not None:
                        out.student_topk_logprobs[sample] = v[:, layout.topk_logprobs]
                    elif k:
                        out.student_topk_ids[sample] = v[:, layout.topk_ids].long()
                else:
                    out.teacher_logprobs[sample] = v[:, layout.logprob]
                    if k:
                        out.teacher_topk_logprobs[sample] = v[:, layout.topk_logprobs]
        return torch.zeros((), device=cols.device), {}

    from megatron_rlrt.precision import logprob_precision

    chunks = list(chunks)
    with torch.no_grad(), logprob_precision(getattr(chunks[0], "config", None), opts.logprob_precision):
        run_pipeline(chunks, mbs, opts, store, forward_only=True)
    return out


def score_rollouts(chunks, samples: Sequence[Sample], opts: StepOptions, micro_batch_size: int,
                   max_tokens: int | None, teacher: WeightSnapshot | None,
                   reference: WeightSnapshot | None) -> Collected:
    """Old-policy and teacher log-probs of a step's samples (ONE packed pass when the teacher
    is the current policy, ``teacher`` None), then the reference policy's log-probs of the
    student rows when the KL term is on (``reference``)."""
    log_probs_only = replace(opts, topk=0, with_entropy=False)
    students = [replace(s, teacher_prompt_ids=None) for s in samples]

    def run(rows, run_opts, weights=None, topk_ids=None):
        if weights is None:
            return collect(chunks, rows, run_opts, micro_batch_size, max_tokens, topk_ids)
        with weights.swapped_in(chunks):
            return collect(chunks, rows, run_opts, micro_batch_size, max_tokens, topk_ids)

    def with_reference(out: Collected) -> Collected:
        if reference is not None:
            out.ref_logprobs = run(students, log_probs_only, reference).student_logprobs
        return out

    if teacher is None:  # the current-policy teacher shares the old-policy pass (eq. 1)
        return with_reference(run(samples, opts))
    out = run(students, opts)
    distill = bool(opts.topk)
    if teacher is reference and not distill:  # both the starting weights: one pass for both
        both = run(samples, log_probs_only, reference)
        out.teacher_logprobs, out.ref_logprobs = both.teacher_logprobs, both.student_logprobs
        return out
    teachers = [replace(s, prompt_ids=s.teacher_prompt_ids, teacher_prompt_ids=None) for s in samples if s.has_teacher]
    if teachers and distill:  # the teacher is scored at the policy's top-K ids of each position
        ids = stage_topk_ids(teachers, lambda i: out.student_topk_ids[i], opts.topk)
        res = run(teachers, replace(opts, with_entropy=False), teacher, ids)
        out.teacher_logprobs, out.teacher_topk_logprobs = res.student_logprobs, res.student_topk_logprobs
    elif teachers:
        out.teacher_logprobs = run(teachers, log_probs_only, teacher).student_logprobs
    return with_reference(out)


def stage_topk_ids(samples: Sequence[Sample], ids_of: Callable[[int], torch.Tensor], topk: int
                   ) -> dict[int, torch.Tensor]:
    """The top-K ids a pass scores at: ``ids_of(sample index)`` on the last pipeline stage
    (the only one that has and reads them), same-shaped zeros on the others."""
    from megatron.core import parallel_state as ps

    if ps.is_pipeline_last_stage(ignore_virtual=True):
        return {s.index: ids_of(s.index) for s in samples}
    return {s.index: torch.zeros(len(s.response_ids), topk, dtype=torch.long) for s in samples}


# --- train: forward + backward of one optimizer mini-batch -----------------------------------


def train_minibatch(chunks, samples: Sequence[Sample], opts: StepOptions, micro_batch_size: int,
                    max_tokens: int | None, loss_fn: Callable, topk_ids: dict[int, torch.Tensor] | None) -> list[dict]:
    """Forward+backward over this rank's samples of the mini-batch; returns loss_fn's metrics."""
    cp_size, cp_rank = cp_size_rank()
    mbs = [build_microbatch(rows, opts, topk_ids) for rows in
           plan_microbatches(samples, False, micro_batch_size, max_tokens, cp_size)]
    return run_pipeline(chunks, mbs, opts, report_on_cp_rank0(loss_fn, cp_rank), forward_only=False)


def student_values(mb: MicroBatch, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T, C] columns of the micro-batch's student rows, mask [B, T]) -- differentiable."""
    full = cols.new_zeros((mb.packed.num_tokens, cols.shape[1]))
    full = full.index_put((mb.label_positions.to(cols.device),), cols)
    return mb.packed.gather_student(full)
