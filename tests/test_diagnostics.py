import math

import numpy as np
import pytest
import torch

from megatron_rlrt.algorithms import token_advantages
from megatron_rlrt.algorithms.diagnostics import (
    credit_diagnostics,
    mean_abs_advantage_shift,
    position_asymmetry,
    positive_asymmetry_fraction,
    teacher_coverage,
    weight_clip_fractions,
    weight_quantiles,
)

LN = math.log


def test_positive_asymmetry_fraction_by_hand():
    s = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    t = torch.tensor([[-2.0, -1.0, -0.5], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # D = s - t over masked tokens: [1, -1, 0, 2] -> 2 of 4 positive
    assert positive_asymmetry_fraction(s, t, mask) == pytest.approx(0.5)
    assert math.isnan(positive_asymmetry_fraction(s, t, torch.zeros(2, 3, dtype=torch.bool)))


def test_weight_quantiles_and_clip_fractions():
    w = torch.tensor([[0.2, 0.9, 1.0, 1.1, 3.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5, [False] * 5])
    q = weight_quantiles(w, mask, quantiles=(0.25, 0.5, 0.9))
    expected = np.quantile([0.2, 0.9, 1.0, 1.1, 3.0], [0.25, 0.5, 0.9])
    assert [q["q25"], q["q50"], q["q90"]] == pytest.approx(expected.tolist())
    # eps_w = .5: below .5 -> {.2}; above 1.5 -> {3.0}
    assert weight_clip_fractions(w, mask, 0.5) == pytest.approx((0.2, 0.2))


def test_mean_abs_shift_and_coverage():
    adv = torch.tensor([0.5, -1.0])
    token_adv = torch.tensor([[0.6, 0.5, 9.0], [-1.0, -0.7, -1.2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # |A_t - A|: [.1, 0, | 0, .3, .2] -> .6 / 5
    assert mean_abs_advantage_shift(token_adv, adv, mask) == pytest.approx(0.12)
    has, wanted = torch.tensor([True, False, True, False]), torch.tensor([True, True, True, False])
    assert teacher_coverage(has, wanted) == pytest.approx(2 / 3)


def test_position_asymmetry_equals_full_kl_when_k_equals_v():
    g = torch.Generator().manual_seed(0)
    s_all = torch.randn(2, 3, 6, generator=g, dtype=torch.float64).log_softmax(-1)
    t_all = torch.randn(2, 3, 6, generator=g, dtype=torch.float64).log_softmax(-1)
    s_topk, idx = s_all.topk(6, dim=-1)
    kl = position_asymmetry(s_topk, t_all.gather(-1, idx))
    p, q = s_all.exp().numpy(), t_all.exp().numpy()
    expected = (p * (np.log(p) - np.log(q))).sum(-1)
    np.testing.assert_allclose(kl.numpy(), expected, atol=1e-6)


def test_credit_diagnostics_for_rlrt():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    adv = torch.tensor([0.5, 0.5, -0.5, -0.5])
    s = torch.full((4, 2), -1.0)
    t = s - torch.tensor([[LN(2.0), -LN(2.0)], [LN(1.2), 0.0], [1.0, 1.0], [1.0, 1.0]])
    mask = torch.ones(4, 2, dtype=torch.bool)
    has_teacher = torch.tensor([True, True, False, False])
    tok = token_advantages("rlrt", adv, rewards, s, t, mask, 0.5, 0.5, has_teacher)
    out = credit_diagnostics("rlrt", adv, tok, rewards, s, t, mask, has_teacher, eps_w=0.5,
                             requested=torch.tensor([True, True, False, False]))
    # weights on gated tokens: [2, .5, 1.2, 1]; D > 0 on 2 of 4; clip low {.5 is not < .5} 0, high {2} 1/4
    assert out["credit/frac_pos_asym_correct"] == pytest.approx(0.5)
    assert out["credit/weight_clip_low"] == 0.0 and out["credit/weight_clip_high"] == pytest.approx(0.25)
    assert out["credit/weight_q50"] == pytest.approx(1.1)
    assert out["credit/teacher_coverage"] == 1.0
    # |A_t - A| on rows 0, 1: [.125, .125, .05, 0], rows 2, 3: 0 -> .3 / 8
    assert out["credit/mean_abs_adv_shift"] == pytest.approx(0.3 / 8)
