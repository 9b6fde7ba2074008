"""The trainer's typed data: column layout, metric sums, token counts, credit metrics, RL loss."""

import math

import pytest
import torch

from megatron_rlrt.algorithms import get_method, loss_token_mask, policy_token_loss, total_loss
from megatron_rlrt.algorithms.diagnostics import credit_diagnostics, credit_metric_sums
from megatron_rlrt.trainer.logprobs import ColumnLayout, LogprobRequest
from megatron_rlrt.trainer.metrics import MetricSums
from megatron_rlrt.trainer.rollout_batch import Sample


@pytest.mark.parametrize("entropy,k,ids", [(False, 0, False), (True, 0, False), (True, 3, True), (False, 4, False)])
def test_column_layout_tiles_the_columns(entropy, k, ids):
    layout = ColumnLayout(entropy, k, ids)
    used = [layout.logprob] + ([layout.entropy] if entropy else []) + list(range(layout.width))[layout.topk_logprobs] \
        + list(range(layout.width))[layout.topk_ids]
    assert used == list(range(layout.width))  # every column once, in the documented order
    assert layout.width == 1 + entropy + k + (k if ids else 0)


def test_column_layout_of_request():
    pos = torch.arange(3)
    assert ColumnLayout.of(LogprobRequest(pos, pos, topk=2)).with_topk_ids  # ids chosen by the pass: returned
    assert not ColumnLayout.of(LogprobRequest(pos, pos, topk=2, topk_ids=torch.zeros(3, 2))).with_topk_ids
    assert not ColumnLayout.of(LogprobRequest(pos, pos)).with_topk_ids


def test_metric_sums_merge_like_one_batch():
    rank0, rank1 = MetricSums(), MetricSums()
    rank0.add("loss/pg", 3.0, 2.0)  # sum 3 over 2 tokens
    rank1.add("loss/pg", 1.0, 2.0)
    rank0.add("x_max", 5.0)
    rank1.add("x_max", 7.0)
    rank0.add("perf/tokens_total", 10.0)
    rank1.add("perf/tokens_total", 4.0)
    rank1.add("only_here", 2.0, 0.0)
    means = MetricSums().merge(rank0).merge(rank1).means()
    assert means["loss/pg"] == 1.0 and means["x_max"] == 7.0 and means["perf/tokens_total"] == 14.0
    assert math.isnan(means["only_here"])  # no weight: undefined, not a division error


def test_sample_token_counts():
    s = Sample(0, 0, [1, 2, 3], [4, 5], [0.0, 0.0], 1.0, True, 0.5, teacher_prompt_ids=[7] * 6)
    assert (s.student_tokens, s.teacher_tokens, s.num_tokens) == (5, 8, 13)
    bare = Sample(1, 0, [1, 2, 3], [4, 5], [0.0, 0.0], 0.0, False, -0.5)
    assert (bare.student_tokens, bare.teacher_tokens, bare.num_tokens) == (5, 0, 5)


def test_credit_metric_sums_agree_with_the_diagnostics():
    """The sums the trainer logs, divided by their counts, are the diagnostics' means."""
    g = torch.Generator().manual_seed(0)
    b, t = 4, 6
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 4:] = False
    s_lp, t_lp = -torch.rand(b, t, generator=g) * 3, -torch.rand(b, t, generator=g) * 3
    adv = torch.tensor([0.8, -0.4, 1.2, 0.3])
    correct = torch.tensor([True, False, True, True])
    has_teacher = torch.tensor([True, True, False, True])
    spec = get_method("rlrt")
    from megatron_rlrt.algorithms import token_advantages

    tok_adv = token_advantages("rlrt", adv, correct.float(), s_lp, t_lp, mask, 1.0, 0.2, has_teacher)
    sums = credit_metric_sums(spec, adv, tok_adv, correct, s_lp, t_lp, mask, has_teacher, 0.2)
    means = {k: v / w for k, (v, w) in sums.items()}
    ref = credit_diagnostics("rlrt", adv, tok_adv, correct.float(), s_lp, t_lp, mask, has_teacher, 0.2)
    assert means["rlrt/adv_abs_shift_mean"] == pytest.approx(ref["credit/mean_abs_adv_shift"])
    assert means["rlrt/d_positive_frac"] == pytest.approx(ref["credit/frac_pos_asym_correct"])
    assert means["rlrt/clip_frac_low"] == pytest.approx(ref["credit/weight_clip_low"])
    assert means["rlrt/clip_frac_high"] == pytest.approx(ref["credit/weight_clip_high"])
    assert means["rlrt/teacher_tokens_frac"] == pytest.approx(float((mask & has_teacher[:, None]).sum() / mask.sum()))
    tmask = mask & has_teacher[:, None]  # ATESD's mismatch: mean log P_S - log P_T over teacher-row tokens
    assert means["teacher/mismatch"] == pytest.approx(float((s_lp - t_lp)[tmask].mean()))
    # no weighting method: only the shift and the teacher-token fraction
    assert set(credit_metric_sums(get_method("grpo"), adv, tok_adv, correct, s_lp, t_lp, mask, has_teacher, 0.2)) == {
        "rlrt/adv_abs_shift_mean", "rlrt/teacher_tokens_frac"}


@pytest.mark.parametrize("method", ["grpo", "sdpo", "srpo"])
def test_rl_loss_of_a_packed_microbatch_equals_the_algorithm_functions(method):
    """rl_loss reads the packed columns through the layout and returns what policy_token_loss /
    distillation_token_loss / total_loss give on the same per-sample tensors (padded by hand)."""
    from megatron_rlrt.algorithms import distillation_token_loss
    from megatron_rlrt.trainer.loss import rl_loss
    from tests.helpers.loss_case import packed_loss_case

    case = packed_loss_case(method)
    samples, mb, cols, inputs, spec, config, k = (case.samples, case.mb, case.cols, case.inputs, case.spec,
                                                  case.config, case.topk)
    assert cols.shape[1] == ColumnLayout.of(mb.request).width
    loss, count, metrics = rl_loss(mb, cols, inputs, spec, config)

    # the same by hand: columns of each sample's response tokens, in row order
    per_row, start = [], 0
    for s in samples:
        per_row.append(cols[start : start + len(s.response_ids)])
        start += len(s.response_ids)
    width = 3
    pad = lambda xs: torch.stack([torch.nn.functional.pad(x, (0, 0, 0, width - len(x))) if x.dim() == 2  # noqa: E731
                                  else torch.nn.functional.pad(x, (0, width - len(x))) for x in xs])
    mask = pad([torch.ones(len(s.response_ids)) for s in samples]).bool()
    c = pad(per_row)
    pieces = policy_token_loss(c[..., 0], pad([inputs[s.index].old_logprobs for s in samples]),
                               pad([inputs[s.index].advantages for s in samples]), mask, config.policy,
                               rollout_logprobs=pad([inputs[s.index].rollout_logprobs for s in samples]), entropy=c[..., 1])
    rewards = torch.tensor([1.0, 0.0])
    distill = None
    if k:
        distill = distillation_token_loss(c[..., 2:], pad([inputs[s.index].teacher_topk_logprobs for s in samples]))
    want, _ = total_loss(method, mask, rewards, None if spec.loss == "distill" else pieces.pg, distill,
                         torch.tensor([True, True]), pieces.regularizer, 0.7, global_num_tokens=1.0, global_num_seqs=1.0)
    assert torch.allclose(loss, want)
    assert int(count) == int(loss_token_mask(method, mask, rewards, torch.tensor([True, True])).sum())
    assert "loss/pg" in metrics
    loss.backward()
    assert cols.grad.abs().sum() > 0
