import math

import pytest
import torch

from megatron_rlrt.algorithms import (
    METHODS,
    get_method,
    group_advantages,
    make_lambda_schedule,
    rlrt_weight,
    rlsd_weight,
    token_advantages,
)
from megatron_rlrt.algorithms.schedules import ConstantSchedule, LinearDecaySchedule

LN = math.log


def example():
    """One group of 4: rewards [1, 1, 0, 0], A = r - mean = [.5, .5, -.5, -.5] (no std norm).

    D_t = log P_S - log P_T is set directly: teacher log-probs = student - D.
    """
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    adv = torch.tensor([0.5, 0.5, -0.5, -0.5])
    d = torch.tensor(
        [
            [LN(2.0), -LN(2.0), 0.0],
            [LN(1.2), LN(0.9), 0.0],
            [LN(2.0), LN(0.5), LN(1.1)],
            [LN(3.0), LN(0.2), LN(1.0)],
        ],
        dtype=torch.float64,
    )
    student = torch.full((4, 3), -1.0, dtype=torch.float64)
    teacher = student - d
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    return rewards, adv, student, teacher, mask


def test_rlrt_matches_hand_computation():
    rewards, adv, s, t, mask = example()
    out = token_advantages("rlrt", adv, rewards, s, t, mask, lam=0.5, eps_w=0.5)
    # row 0 (r=1, A=.5): w = exp(+D) = [2, .5, 1] -> clip to [1.5, .5, 1]
    #   factor = .5 + .5 * clip = [1.25, .75, 1.0] -> A_t = [.625, .375, .5]
    # row 1: w = [1.2, .9] -> factor [1.1, .95] -> A_t = [.55, .475], padding -> 0
    # rows 2, 3 (r=0): A_t = A = -.5
    expected = torch.tensor(
        [[0.625, 0.375, 0.5], [0.55, 0.475, 0.0], [-0.5, -0.5, -0.5], [-0.5, -0.5, -0.5]]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert out.dtype == torch.float32


def test_rlrt_all_and_rlsd_match_hand_computation():
    rewards, adv, s, t, mask = example()
    rlrt_all = token_advantages("rlrt_all", adv, rewards, s, t, mask, lam=0.5, eps_w=0.5)
    # row 2 (A = -.5): w = exp(-D) = [.5, 2, 1/1.1] -> clip [.5, 1.5, .90909]
    #   factor = [.75, 1.25, .954545] -> A_t = [-.375, -.625, -.4772727]
    torch.testing.assert_close(rlrt_all[2], torch.tensor([-0.375, -0.625, -0.5 * (0.5 + 0.5 / 1.1)]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rlrt_all[0], torch.tensor([0.625, 0.375, 0.5]), atol=1e-6, rtol=0)

    rlsd = token_advantages("rlsd", adv, rewards, s, t, mask, lam=0.5, eps_w=0.5)
    # row 0 (A = .5): w = exp(-D) = [.5, 2, 1] -> clip [.5, 1.5, 1] -> factor [.75, 1.25, 1]
    torch.testing.assert_close(rlsd[0], torch.tensor([0.375, 0.625, 0.5]), atol=1e-6, rtol=0)
    # row 2 (A = -.5): w = exp(+D) = [2, .5, 1.1] -> clip [1.5, .5, 1.1] -> factor [1.25, .75, 1.05]
    torch.testing.assert_close(rlsd[2], torch.tensor([-0.625, -0.375, -0.525]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["grpo", "grpo_eb", "rlrt", "rlrt_all", "rlsd", "sdpo", "srpo", "opsd"])
def test_lam_zero_is_grpo_exactly(method):
    rewards, adv, s, t, mask = example()
    out = token_advantages(method, adv, rewards, s, t, mask, lam=0.0, eps_w=1.0)
    expected = torch.where(mask, adv[:, None].expand(4, 3), torch.zeros(4, 3))
    assert torch.equal(out, expected)


def test_r0_rows_untouched_in_rlrt_even_for_extreme_asymmetry():
    rewards, adv, s, t, mask = example()
    t = t.clone()
    t[2:] = torch.tensor([[-30.0, 0.0, -1e-3], [-50.0, -0.1, -7.0]], dtype=torch.float64)
    out = token_advantages("rlrt", adv, rewards, s, t, mask, lam=1.0, eps_w=1.0)
    assert torch.equal(out[2:], torch.full((2, 3), -0.5))


def test_rlrt_and_rlsd_weights_are_reciprocal_before_clipping():
    g = torch.Generator().manual_seed(0)
    s = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 5
    t = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 5
    adv = torch.tensor([1.3, -0.7, 0.2, -2.0, 0.5], dtype=torch.float64)[:, None]
    product = rlrt_weight(adv, s, t) * rlsd_weight(adv, s, t)
    torch.testing.assert_close(product, torch.ones_like(product), rtol=1e-12, atol=1e-12)
    # eq. 6 directly: (P_S / P_T) ** sign(A)
    torch.testing.assert_close(rlrt_weight(adv, s, t), (s.exp() / t.exp()) ** torch.sign(adv))


@pytest.mark.parametrize("method", ["rlrt", "rlrt_all", "rlsd"])
@pytest.mark.parametrize("lam,eps_w", [(0.5, 0.2), (1.0, 1.0), (0.3, 0.5)])
def test_perturbation_bounded_by_lam_eps(method, lam, eps_w):
    g = torch.Generator().manual_seed(1)
    rewards = (torch.rand(16, generator=g) > 0.5).float()
    adv, _ = group_advantages(rewards, group_size=8, std_normalize=True)
    s = -torch.rand(16, 11, generator=g) * 8
    t = -torch.rand(16, 11, generator=g) * 8
    mask = torch.ones(16, 11, dtype=torch.bool)
    out = token_advantages(method, adv, rewards, s, t, mask, lam=lam, eps_w=eps_w)
    bound = lam * eps_w * adv.abs()[:, None]
    assert bool(((out - adv[:, None]).abs() <= bound + 1e-6).all())


def test_rows_without_teacher_and_padding():
    rewards, adv, s, t, mask = example()
    t = t.clone()
    t[1] = float("nan")  # no teacher view for row 1: its teacher log-probs are garbage
    s = s.clone()
    s[1, 2] = float("nan")  # padding position
    has_teacher = torch.tensor([True, False, True, True])
    out = token_advantages("rlrt", adv, rewards, s, t, mask, lam=0.5, eps_w=0.5, has_teacher=has_teacher)
    torch.testing.assert_close(out[1], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(out[0], torch.tensor([0.625, 0.375, 0.5]), atol=1e-6, rtol=0)
    # no teacher anywhere: teacher_logprobs may be None
    no_teacher = torch.zeros(4, dtype=torch.bool)
    none = token_advantages("rlrt", adv, rewards, s.nan_to_num(), None, mask, 0.5, 0.5, has_teacher=no_teacher)
    assert torch.equal(none, torch.where(mask, adv[:, None].expand(4, 3), torch.zeros(4, 3)))


def test_all_equal_groups_give_zero_token_advantages():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    adv, _ = group_advantages(rewards, group_size=4, std_normalize=True)
    s = -torch.rand(8, 5)
    t = -torch.rand(8, 5) * 3
    for method in ("rlrt", "rlrt_all", "rlsd"):
        out = token_advantages(method, adv, rewards, s, t, torch.ones(8, 5, dtype=torch.bool), lam=1.0, eps_w=1.0)
        assert torch.equal(out, torch.zeros(8, 5))


def test_bad_inputs_raise_clear_errors():
    rewards, adv, s, t, mask = example()
    with pytest.raises(ValueError, match=r"unknown method 'rlrtt'.*'grpo'.*'rlrt'"):
        token_advantages("rlrtt", adv, rewards, s, t, mask, 0.5, 0.5)
    with pytest.raises(ValueError, match="teacher_logprobs has shape"):
        token_advantages("rlrt", adv, rewards, s, t[:, :2], mask, 0.5, 0.5)
    with pytest.raises(ValueError, match="seq_advantages has shape"):
        token_advantages("rlrt", adv[:3], rewards, s, t, mask, 0.5, 0.5)
    bad = s.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="student_logprobs has 1 NaN/inf.*row 0, token 1"):
        token_advantages("rlrt", adv, rewards, bad, t, mask, 0.5, 0.5)
    bad = t.clone()
    bad[2, 0] = float("-inf")
    with pytest.raises(ValueError, match="teacher_logprobs has 1 NaN/inf"):
        token_advantages("rlsd", adv, rewards, s, bad, mask, 0.5, 0.5)
    with pytest.raises(ValueError, match="needs teacher_logprobs"):
        token_advantages("rlrt", adv, rewards, s, None, mask, 0.5, 0.5)
    with pytest.raises(ValueError, match="lam must be in"):
        token_advantages("rlrt", adv, rewards, s, t, mask, 1.5, 0.5)


def test_method_registry_metadata():
    assert set(METHODS) >= {"grpo", "grpo_eb", "rlrt", "rlrt_all", "rlsd", "sdpo", "srpo", "opsd"}
    assert get_method("rlrt").teacher_rows == "correct" and get_method("rlrt").weight_on == "correct"
    assert get_method("srpo").teacher_rows == "incorrect" and get_method("srpo").loss == "routed"
    assert not get_method("grpo").needs_teacher and not get_method("grpo_eb").needs_teacher
    assert get_method("grpo_eb").entropy_bonus
    assert get_method("rlrt").std_normalize and not get_method("grpo").std_normalize  # Table 5


def test_lambda_schedules():
    const = ConstantSchedule(0.5)
    assert [const.value(s) for s in (0, 10, 1000)] == [0.5, 0.5, 0.5]
    lin = LinearDecaySchedule(0.5, decay_steps=30)
    assert [lin.value(s) for s in (0, 15, 30, 45)] == [0.5, 0.25, 0.0, 0.0]
    assert lin.value(3) == pytest.approx(0.5 * (1 - 3 / 30))
    assert isinstance(make_lambda_schedule(0.5, None), ConstantSchedule)
    assert isinstance(make_lambda_schedule(0.5, 0), ConstantSchedule)
    assert make_lambda_schedule(0.5, 50) == LinearDecaySchedule(0.5, 50)
    assert LinearDecaySchedule(**lin.state_dict()) == lin
    with pytest.raises(ValueError):
        LinearDecaySchedule(0.5, 0)
    with pytest.raises(ValueError):
        ConstantSchedule(1.5)
