import pytest
import torch

from megatron_rlrt.algorithms import loss_token_mask, total_loss
from megatron_rlrt.algorithms.objective import distill_rows

# 4 rollouts x 2 tokens; rewards [1, 0, 0, 1]; teacher views for rows 0, 1, 2 (not 3)
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0])
HAS_TEACHER = torch.tensor([True, True, True, False])
MASK = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)
PG = torch.tensor([[1.0, 2.0], [3.0, 99.0], [4.0, 5.0], [6.0, 7.0]])
DISTILL = torch.tensor([[10.0, 20.0], [30.0, 99.0], [40.0, 50.0], [float("nan"), float("nan")]])


def test_grpo_is_token_mean_of_the_policy_loss():
    loss, _ = total_loss("grpo", MASK, REWARDS, pg_token_loss=PG)
    assert loss.item() == pytest.approx((1 + 2 + 3 + 4 + 5 + 6 + 7) / 7)


def test_sdpo_distils_teacher_rows_only_and_normalises_by_their_tokens():
    loss, m = total_loss("sdpo", MASK, REWARDS, distill_token_loss=DISTILL, has_teacher=HAS_TEACHER)
    # rows 0, 1, 2 have a teacher: tokens 10, 20, 30, 40, 50 -> mean 30 (row 3's NaNs never enter)
    assert loss.item() == pytest.approx(30.0)
    assert distill_rows("sdpo", REWARDS, HAS_TEACHER).tolist() == [True, True, True, False]
    assert "pg_loss" not in m


def test_srpo_routes_failures_with_teacher_to_distillation():
    loss, m = total_loss("srpo", MASK, REWARDS, pg_token_loss=PG, distill_token_loss=DISTILL,
                         has_teacher=HAS_TEACHER, distill_coef=0.5)
    # rows 1, 2 (r = 0, teacher) -> 0.5 * distill: 15, 20, 25; rows 0, 3 -> pg: 1, 2, 6, 7
    assert loss.item() == pytest.approx((1 + 2 + 15 + 20 + 25 + 6 + 7) / 7)
    assert m["distill_loss"].item() == pytest.approx((30 + 40 + 50) / 7)
    assert m["pg_loss"].item() == pytest.approx((1 + 2 + 6 + 7) / 7)


def test_micro_batches_with_loss_token_mask_counts_sum_to_the_whole():
    for method in ("grpo", "sdpo", "srpo"):
        kwargs = dict(pg_token_loss=PG, distill_token_loss=DISTILL.nan_to_num(), has_teacher=HAS_TEACHER)
        full, _ = total_loss(method, MASK, REWARDS, **kwargs)
        n_tok = loss_token_mask(method, MASK, REWARDS, HAS_TEACHER).sum().item()
        parts = [slice(0, 1), slice(1, 4)]
        summed = sum(
            total_loss(method, MASK[p], REWARDS[p], pg_token_loss=PG[p], distill_token_loss=DISTILL.nan_to_num()[p],
                       has_teacher=HAS_TEACHER[p], global_num_tokens=n_tok)[0]
            for p in parts
        )
        assert summed.item() == pytest.approx(full.item())


def test_missing_pieces_raise():
    with pytest.raises(ValueError, match="needs distill_token_loss"):
        total_loss("sdpo", MASK, REWARDS, pg_token_loss=PG, has_teacher=HAS_TEACHER)
    with pytest.raises(ValueError, match="needs pg_token_loss"):
        total_loss("rlrt", MASK, REWARDS)
    with pytest.raises(ValueError, match="unknown method"):
        total_loss("ppo", MASK, REWARDS, pg_token_loss=PG)
    with pytest.raises(ValueError, match="pg_token_loss has shape"):
        total_loss("grpo", MASK, REWARDS, pg_token_loss=PG[:, :1])
