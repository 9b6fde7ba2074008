"""The two kinds of pass the RL step makes through megatron's pipeline schedules.

``collect`` (no grad): ONE packed forward over student rows [prompt + response] and teacher
rows [teacher prompt + the same response] gives log P_S(y_t) (the old policy for PPO) and
log P_T(y_t) from the same weights, kernels and precision -- the small difference D_t that
RLRT amplifies is never a difference between two engines.

``train``: micro-batches of student rows, forward + backward with the method's loss; the
loss is returned as a SUM with its normaliser count and megatron (calculate_per_token_loss)
divides the gradients by the count summed over micro-batches and data-parallel ranks, so
token-mean is over the whole optimizer mini-batch.

Both run ``get_forward_backward_func()``: no pipeline, 1F1B or interleaved, as configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from megatron_rlrt.packing import PackedBatch, PackRow, pack_rows, plan_packs
from megatron_rlrt.trainer.logprobs import LogprobRequest, logprob_columns
from megatron_rlrt.trainer.rollout_batch import Sample


@dataclass
class MicroBatch:
    packed: PackedBatch
    request: LogprobRequest
    # distillation: for each label position, the label position of the same response token in
    # the sample's student row (whose top-K ids the teacher is read at); -1 for student rows
    teacher_src: torch.Tensor | None = None


@dataclass(frozen=True)
class StepOptions:
    temperature: float = 1.0
    with_entropy: bool = False
    topk: int = 0  # distillation top-K (0: off)
    use_te: bool = False  # Transformer Engine layers (GPU); packed rows go as THD either way
    pad_to_multiple_of: int = 1


def _rows(samples: Sequence[Sample], with_teachers: bool) -> list[PackRow]:
    rows = [PackRow(s.prompt_ids, s.response_ids, "student", s.index) for s in samples]
    if with_teachers:
        rows += [PackRow(s.teacher_prompt_ids, s.response_ids, "teacher", s.index) for s in samples if s.has_teacher]
    return rows


def plan_microbatches(samples: Sequence[Sample], with_teachers: bool, micro_batch_size: int,
                      max_tokens: int | None) -> list[list[PackRow]]:
    """Rows per micro-batch: by token budget (dynamic) or ``micro_batch_size`` samples each
    (a sample's teacher row always travels with it)."""
    rows = _rows(samples, with_teachers)
    if max_tokens is not None:
        longest = max(len(r) for r in rows)
        if longest > max_tokens:
            raise ValueError(f"a rollout row has {longest} tokens > --max-tokens-per-gpu {max_tokens}; raise the "
                             "budget to at least the longest prompt + response (+ teacher prompt)")
        return [[rows[i] for i in pack] for pack in plan_packs(rows, max_tokens, 1)[0]]
    by_sample: dict[int, list[PackRow]] = {}
    for r in rows:
        by_sample.setdefault(r.sample_index, []).append(r)
    order = [s.index for s in samples]
    return [[r for i in order[k : k + micro_batch_size] for r in by_sample[i]]
            for k in range(0, len(order), micro_batch_size)]


def build_microbatch(rows: list[PackRow], opts: StepOptions, topk_ids: dict[int, torch.Tensor] | None = None
                     ) -> MicroBatch:
    """Pack rows; request log-probs at every position that predicts a response token."""
    packed = pack_rows(rows, opts.pad_to_multiple_of)
    positions = packed.label_mask[0].nonzero()[:, 0]
    targets = packed.labels[0, positions]
    ids = None
    if topk_ids is not None:  # training pass of a distillation method: the ids chosen in collect
        full = torch.zeros((packed.num_tokens, opts.topk), dtype=torch.long)
        for row, sample in enumerate(packed.student_sample_index.tolist()):
            idx = packed.student_index[row][packed.student_mask[row]]
            full[idx] = topk_ids[sample][: len(idx)]
        ids = full[positions]
    request = LogprobRequest(positions, targets, opts.temperature, opts.with_entropy, opts.topk, ids)
    teacher_src = None
    if opts.topk and topk_ids is None and packed.teacher_index.numel():
        teacher_src = _teacher_sources(packed, positions)
    return MicroBatch(packed, request, teacher_src)


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
        # teacher rows are scored at the top-K ids of the matching student position
        k = req.topk
        is_teacher = context.teacher_src >= 0
        ids = cols[:, -k:].long()
        t_ids = ids[context.teacher_src[is_teacher]]
        t_req = LogprobRequest(req.positions[is_teacher], req.targets[is_teacher], req.temperature,
                               req.with_entropy, k, t_ids)
        t_cols = logprob_columns(selected[is_teacher], weight, t_req, config.sequence_parallel)
        cols = cols.clone()
        cols[is_teacher, : t_cols.shape[1]] = t_cols
        cols[is_teacher, -k:] = t_ids.float()
    return cols


def model_inputs(mb: MicroBatch, opts: StepOptions, device: torch.device) -> dict:
    """Packed (THD) inputs: row boundaries as ``cu_seqlens``, no [N, N] mask. TE's attention
    (GPU) and the local spec's PackedCoreAttention (CPU) both read them."""
    from megatron.core.packed_seq_params import PackedSeqParams

    packed = mb.packed
    cu = packed.cu_seqlens.to(device)
    return dict(
        input_ids=packed.tokens.to(device), position_ids=packed.position_ids.to(device), attention_mask=None,
        packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                          max_seqlen_q=packed.max_seqlen, max_seqlen_kv=packed.max_seqlen),
    )


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def run_pipeline(chunks, microbatches: list[MicroBatch], opts: StepOptions, loss_fn: Callable,
                 forward_only: bool) -> list:
    """megatron's schedule over ``microbatches``; ``loss_fn(mb, columns)`` runs on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = _device()

    def step(data_iterator, model):
        mb = next(data_iterator)
        request = LogprobRequest(mb.request.positions.to(device), mb.request.targets.to(device),
                                 mb.request.temperature, mb.request.with_entropy, mb.request.topk,
                                 None if mb.request.topk_ids is None else mb.request.topk_ids.to(device))
        ctx = MicroBatch(mb.packed, request, None if mb.teacher_src is None else mb.teacher_src.to(device))
        out = model(**model_inputs(mb, opts, device), output_processor=output_processor,
                    output_processor_context=ctx)
        return out, lambda cols: loss_fn(mb, cols)

    chunks = list(chunks)
    data = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    longest = max(mb.packed.num_tokens for mb in microbatches)
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=data, model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches), seq_length=longest, micro_batch_size=1, forward_only=forward_only,
    )


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
           plan_microbatches(samples, True, micro_batch_size, max_tokens)]
    out = Collected({}, {}, {}, {}, student_topk_logprobs={} if topk_ids is not None else None)
    k = opts.topk
    col_topk = 1 + int(opts.with_entropy)

    def store(mb: MicroBatch, cols: torch.Tensor):
        full = cols.new_zeros((mb.packed.num_tokens, cols.shape[1]))
        full[mb.request.positions.to(cols.device)] = cols.detach()
        for role, gather, sample_index in (("student", mb.packed.gather_student, mb.packed.student_sample_index),
                                           ("teacher", mb.packed.gather_teacher, mb.packed.teacher_sample_index)):
            values, mask = gather(full)
            for row, sample in enumerate(sample_index.tolist()):
                n = int(mask[row].sum())
                v = values[row, :n].float().cpu()
                if role == "student":
                    out.student_logprobs[sample] = v[:, 0]
                    if k and topk_ids is not None:
                        out.student_topk_logprobs[sample] = v[:, col_topk : col_topk + k]
                    elif k:
                        out.student_topk_ids[sample] = v[:, col_topk + k : col_topk + 2 * k].long()
                else:
                    out.teacher_logprobs[sample] = v[:, 0]
                    if k:
                        out.teacher_topk_logprobs[sample] = v[:, col_topk : col_topk + k]
        return torch.zeros((), device=cols.device), {}

    with torch.no_grad():
        run_pipeline(chunks, mbs, opts, store, forward_only=True)
    return out


# --- train: forward + backward of one optimizer mini-batch -----------------------------------


def train_minibatch(chunks, samples: Sequence[Sample], opts: StepOptions, micro_batch_size: int,
                    max_tokens: int | None, loss_fn: Callable, topk_ids: dict[int, torch.Tensor] | None) -> list[dict]:
    """Forward+backward over this rank's samples of the mini-batch; returns loss_fn's metrics."""
    mbs = [build_microbatch(rows, opts, topk_ids) for rows in
           plan_microbatches(samples, False, micro_batch_size, max_tokens)]
    return run_pipeline(chunks, mbs, opts, loss_fn, forward_only=False)


def student_values(mb: MicroBatch, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T, C] columns of the micro-batch's student rows, mask [B, T]) -- differentiable."""
    full = cols.new_zeros((mb.packed.num_tokens, cols.shape[1]))
    full = full.index_put((mb.request.positions.to(cols.device),), cols)
    return mb.packed.gather_student(full)
