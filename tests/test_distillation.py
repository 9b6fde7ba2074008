import math

import numpy as np
import pytest
import torch

from megatron_rlrt.algorithms import distillation_token_loss
from megatron_rlrt.algorithms.distillation import add_tail_bucket, topk_entropy

LN = math.log


def np_kl(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


def full_vocab_case(seed=0, batch=2, length=3, vocab=7):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * 2
    t_logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * 2
    s_all, t_all = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    # SDPO support: the student's top-K ids; K = V here, so every token, in the student's order
    s_topk, idx = s_all.topk(vocab, dim=-1)
    t_topk = t_all.gather(-1, idx)
    return s_all, t_all, s_topk, t_topk


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.3, 1.0])
def test_k_equals_v_tail_vanishes_and_matches_full_vocabulary(alpha):
    s_all, t_all, s_topk, t_topk = full_vocab_case()
    loss = distillation_token_loss(s_topk, t_topk, alpha=alpha, add_tail=True)
    for b in range(2):
        for t in range(3):
            p_s, p_t = s_all[b, t].exp().numpy(), t_all[b, t].exp().numpy()
            if alpha == 0.0:
                expected = np_kl(p_t, p_s)  # forward KL(P_T || P_S)
            elif alpha == 1.0:
                expected = np_kl(p_s, p_t)  # reverse KL(P_S || P_T)
            else:
                m = (1 - alpha) * p_s + alpha * p_t
                expected = (1 - alpha) * np_kl(p_s, m) + alpha * np_kl(p_t, m)
            assert loss[b, t].item() == pytest.approx(expected, abs=1e-6)


def test_tail_bucket_by_hand():
    # V = 4, K = 2. P_S = [.5, .3, .1, .1], P_T = [.2, .6, .1, .1]; the student's top-2 = ids {0, 1}
    # buckets: P_S -> [.5, .3, .2], P_T -> [.2, .6, .2]
    s = torch.tensor([[[LN(0.5), LN(0.3)]]], dtype=torch.float64)
    t = torch.tensor([[[LN(0.2), LN(0.6)]]], dtype=torch.float64)
    torch.testing.assert_close(add_tail_bucket(s)[0, 0, 2], torch.tensor(LN(0.2), dtype=torch.float64))
    reverse = 0.5 * LN(0.5 / 0.2) + 0.3 * LN(0.3 / 0.6) + 0.2 * LN(0.2 / 0.2)
    forward = 0.2 * LN(0.2 / 0.5) + 0.6 * LN(0.6 / 0.3)
    m = [0.35, 0.45, 0.2]
    jsd = 0.5 * (0.5 * LN(0.5 / m[0]) + 0.3 * LN(0.3 / m[1])) + 0.5 * (0.2 * LN(0.2 / m[0]) + 0.6 * LN(0.6 / m[1]))
    assert distillation_token_loss(s, t, alpha=1.0).item() == pytest.approx(reverse, abs=1e-9)
    assert distillation_token_loss(s, t, alpha=0.0).item() == pytest.approx(forward, abs=1e-9)
    assert distillation_token_loss(s, t, alpha=0.5).item() == pytest.approx(jsd, abs=1e-9)
    # without a tail both are renormalised over the top-2: [5/8, 3/8] vs [1/4, 3/4]
    no_tail = 5 / 8 * LN((5 / 8) / (1 / 4)) + 3 / 8 * LN((3 / 8) / (3 / 4))
    assert distillation_token_loss(s, t, alpha=1.0, add_tail=False).item() == pytest.approx(no_tail, abs=1e-9)


def test_gradient_flows_to_student_only():
    _, _, s_topk, t_topk = full_vocab_case(seed=1, vocab=5)
    s = s_topk[..., :3].clone().requires_grad_(True)
    t = t_topk[..., :3].clone().requires_grad_(True)
    distillation_token_loss(s, t, alpha=0.5).sum().backward()
    assert s.grad is not None and bool(s.grad.abs().sum() > 0)
    assert t.grad is None


def test_srpo_entropy_weight_and_is_weight():
    s = torch.tensor([[[LN(0.5), LN(0.3)]]], dtype=torch.float64)
    t = torch.tensor([[[LN(0.2), LN(0.6)]]], dtype=torch.float64)
    base = distillation_token_loss(s, t, alpha=0.5)
    assert torch.equal(distillation_token_loss(s, t, alpha=0.5, entropy_beta=0.0), base)
    h_t = -(0.2 * LN(0.2) + 0.6 * LN(0.6) + 0.2 * LN(0.2))  # teacher top-2 + tail entropy
    weighted = distillation_token_loss(s, t, alpha=0.5, entropy_beta=1.0)
    assert weighted.item() == pytest.approx(base.item() * math.exp(-h_t), rel=1e-9)
    h_given = torch.tensor([[2.0]], dtype=torch.float64)
    given = distillation_token_loss(s, t, alpha=0.5, entropy_beta=0.5, teacher_entropy=h_given)
    assert given.item() == pytest.approx(base.item() * math.exp(-1.0), rel=1e-9)
    halved = distillation_token_loss(s, t, alpha=0.5, is_weight=torch.tensor([[0.5]], dtype=torch.float64))
    assert halved.item() == pytest.approx(base.item() / 2, rel=1e-12)


def test_topk_entropy_full_vocabulary():
    s_all, _, s_topk, _ = full_vocab_case(vocab=6)
    expected = -(s_all.exp() * s_all).sum(-1)
    # the tail is floored at mass 1e-7 (finite log, as SDPO): it adds -1e-7 ln 1e-7 = 1.6e-6
    torch.testing.assert_close(topk_entropy(s_topk), expected, atol=2e-6, rtol=0)


def test_bad_inputs_raise():
    s = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="shapes differ"):
        distillation_token_loss(s, torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="alpha"):
        from megatron_rlrt.algorithms.distillation import generalized_jsd

        generalized_jsd(s, s, alpha=1.5)
