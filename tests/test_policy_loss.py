import math

import pytest
import torch

from megatron_rlrt.algorithms import PolicyLossConfig
from megatron_rlrt.algorithms.policy_loss import aggregate_loss, kl_penalty, policy_loss

LN = math.log


def two_by_three():
    """Row 0 has A = +1, row 1 has A = -1; ratios pi/pi_old chosen to hit every branch:

    row 0: rho = [1.5, 0.5, 1.0]  -> high clip (1.5 > 1.28), below-range but A > 0 so unclipped, plain
    row 1: rho = [0.5, 4.0, 1.1]  -> low clip (0.5 < 0.8), dual clip (4 > c = 3), plain
    """
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -3.0, -0.7]], dtype=torch.float64)
    ratio = torch.tensor([[1.5, 0.5, 1.0], [0.5, 4.0, 1.1]], dtype=torch.float64)
    new = (old + ratio.log()).clone().requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    return new, old, adv, mask


# per-token loss L = max(-A rho, -A clip(rho, .8, 1.28)), then for A < 0: min(L, -A * 3)
#   row 0: [-1.28, max(-.5, -.8) = -.5, -1.0]
#   row 1: [max(.5, .8) = .8, min(max(4, 1.28), 3) = 3, 1.1]
TOKEN_LOSS = [[-1.28, -0.5, -1.0], [0.8, 3.0, 1.1]]


def test_ppo_loss_hand_computed_every_branch():
    new, old, adv, mask = two_by_three()
    loss, metrics = policy_loss(new, old, adv, mask, PolicyLossConfig())
    # token-mean: (-1.28 - .5 - 1 + .8 + 3 + 1.1) / 6 = 2.12 / 6
    assert loss.item() == pytest.approx(2.12 / 6, abs=1e-12)
    assert metrics["pg_clipfrac_high"].item() == pytest.approx(1 / 6)
    assert metrics["pg_clipfrac_low"].item() == pytest.approx(1 / 6)
    assert metrics["pg_clipfrac_dual"].item() == pytest.approx(1 / 6)
    expected_kl = -(LN(1.5) + LN(0.5) + 0 + LN(0.5) + LN(4.0) + LN(1.1)) / 6  # mean(old - new)
    assert metrics["ppo_kl"].item() == pytest.approx(expected_kl, abs=1e-12)
    assert all(not v.requires_grad for v in metrics.values())

    loss.backward()
    # d/d logp of -A rho = -A rho where unclipped, 0 where a clip decides the loss
    expected_grad = torch.tensor([[0.0, -0.5, -1.0], [0.0, 0.0, 1.1]], dtype=torch.float64) / 6
    torch.testing.assert_close(new.grad, expected_grad)


def test_ppo_loss_without_dual_clip():
    new, old, adv, mask = two_by_three()
    loss, _ = policy_loss(new, old, adv, mask, PolicyLossConfig(dual_clip_c=None))
    assert loss.item() == pytest.approx((-1.28 - 0.5 - 1.0 + 0.8 + 4.0 + 1.1) / 6, abs=1e-12)


def test_aggregation_modes_by_hand():
    new, old, adv, mask = two_by_three()
    mask[0, 2] = False  # drop row 0's last token
    tok = PolicyLossConfig(agg_mode="token-mean")
    loss, _ = policy_loss(new, old, adv, mask, tok)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 3.0 + 1.1) / 5, abs=1e-12)
    loss, _ = policy_loss(new, old, adv, mask, PolicyLossConfig(agg_mode="seq-mean-token-mean"))
    assert loss.item() == pytest.approx(((-1.28 - 0.5) / 2 + (0.8 + 3.0 + 1.1) / 3) / 2, abs=1e-12)
    loss, _ = policy_loss(new, old, adv, mask, PolicyLossConfig(agg_mode="seq-mean-token-sum"))
    assert loss.item() == pytest.approx(((-1.28 - 0.5) + (0.8 + 3.0 + 1.1)) / 2, abs=1e-12)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_sum_to_the_mini_batch_loss(mode):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(6, 5, generator=g, dtype=torch.float64) * 3
    new = (old + 0.4 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(6, 1, generator=g, dtype=torch.float64).expand(6, 5)
    mask = torch.rand(6, 5, generator=g) > 0.3
    mask[:, 0] = True
    mask[4] = False  # a sequence without loss tokens is not counted
    cfg = PolicyLossConfig(agg_mode=mode)
    full, _ = policy_loss(new, old, adv, mask, cfg)
    (full_grad,) = torch.autograd.grad(full, new)

    n_tok, n_seq = mask.sum().item(), (mask.sum(-1) > 0).sum().item()
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    total = sum(
        policy_loss(new[p], old[p], adv[p], mask[p], cfg, global_num_tokens=n_tok, global_num_seqs=n_seq)[0]
        for p in parts
    )
    (micro_grad,) = torch.autograd.grad(total, new)
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(micro_grad, full_grad)


def test_truncated_importance_sampling_by_hand():
    new, old, adv, mask = two_by_three()
    # exp(old - rollout) = [[1, 3 -> capped at 2, .25], [1, 1, 1]]
    rollout = old - torch.tensor([[0.0, LN(3.0), LN(0.25)], [0.0, 0.0, 0.0]], dtype=torch.float64)
    loss, m = policy_loss(new, old, adv, mask, PolicyLossConfig(tis_cap=2.0), rollout_logprobs=rollout)
    # row 0: -1.28 * 1 + -.5 * 2 + -1.0 * .25 = -2.53; row 1: .8 + 3 + 1.1 = 4.9
    assert loss.item() == pytest.approx((-2.53 + 4.9) / 6, abs=1e-12)
    assert m["tis_weight_mean"].item() == pytest.approx((1 + 2 + 0.25 + 3) / 6)
    assert m["tis_weight_max"].item() == pytest.approx(2.0)
    assert m["tis_clipped_frac"].item() == pytest.approx(1 / 6)
    off, _ = policy_loss(new, old, adv, mask, PolicyLossConfig(tis_cap=None), rollout_logprobs=rollout)
    assert off.item() == pytest.approx(2.12 / 6, abs=1e-12)


def test_entropy_bonus_and_reference_kl():
    new, old, adv, mask = two_by_three()
    entropy = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    loss, m = policy_loss(new, old, adv, mask, PolicyLossConfig(entropy_coef=0.1), entropy=entropy)
    assert loss.item() == pytest.approx(2.12 / 6 - 0.1 * 0.75, abs=1e-12)
    assert m["entropy"].item() == pytest.approx(0.75)
    loss.backward()
    torch.testing.assert_close(entropy.grad, torch.full((2, 3), -0.1 / 6, dtype=torch.float64))

    # log pi - log pi_ref = ln 2: k1 = ln 2, k3 = 1/2 - (-ln 2) - 1 = ln 2 - 1/2
    logp = torch.tensor([-1.0], dtype=torch.float64)
    ref = logp - LN(2.0)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(LN(2.0))
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(LN(2.0) - 0.5)
    new, old, adv, mask = two_by_three()
    ref = new.detach() - LN(2.0)
    loss, m = policy_loss(new, old, adv, mask, PolicyLossConfig(kl_coef=0.5, kl_type="k3"), ref_logprobs=ref)
    assert loss.item() == pytest.approx(2.12 / 6 + 0.5 * (LN(2.0) - 0.5), abs=1e-12)
    assert m["ref_kl"].item() == pytest.approx(LN(2.0) - 0.5)


def test_bad_inputs_raise():
    new, old, adv, mask = two_by_three()
    with pytest.raises(ValueError, match="agg_mode"):
        PolicyLossConfig(agg_mode="sum")
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        policy_loss(new, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="dual_clip_c"):
        PolicyLossConfig(dual_clip_c=0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        aggregate_loss(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
