import numpy as np
import pytest
import torch

from megatron_rlrt.algorithms import group_advantages


def test_mean_centering_by_hand():
    # group 0: mean 0.5 -> [0.5, -0.5, -0.5, 0.5]; group 1: all equal -> zeros
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv, stats = group_advantages(rewards, group_size=4, std_normalize=False)
    assert torch.equal(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))
    assert stats.num_groups == 2
    assert stats.num_zero_signal_groups == 1
    assert stats.zero_signal_mask.tolist() == [False] * 4 + [True] * 4


def test_std_normalisation_matches_numpy():
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 2, size=(6, 8)).astype(np.float64)
    rewards[0] = 1.0  # one all-equal group
    rewards[1, :] = 0.0
    rewards[1, 3] = 1.0  # one group with a single success
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, ddof=1, keepdims=True)  # unbiased, as verl
    expected = (rewards - mean) / (std + 1e-6)
    adv, stats = group_advantages(torch.tensor(rewards.reshape(-1)), group_size=8, std_normalize=True)
    np.testing.assert_allclose(adv.numpy(), expected.reshape(-1), rtol=1e-6, atol=1e-6)
    # the single success: (1 - 1/8) / (sqrt(1/8) + 1e-6)
    assert adv[8 + 3].item() == pytest.approx((1 - 1 / 8) / (np.sqrt(1 / 8) + 1e-6), rel=1e-6)
    assert stats.num_zero_signal_groups == int(((rewards == rewards[:, :1]).all(axis=1)).sum())


@pytest.mark.parametrize("std_normalize", [False, True])
def test_all_equal_groups_give_exact_zeros(std_normalize):
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3])
    adv, stats = group_advantages(rewards, group_size=3, std_normalize=std_normalize)
    assert torch.equal(adv, torch.zeros(9))
    assert stats.num_zero_signal_groups == 3
    assert bool(stats.zero_signal_mask.all())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="does not divide"):
        group_advantages(torch.zeros(6), group_size=4, std_normalize=False)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), group_size=4, std_normalize=False)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(torch.zeros(4), group_size=1, std_normalize=False)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), group_size=2, std_normalize=False)
