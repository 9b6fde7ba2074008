"""Mask-free packed attention (the local spec's core attention) against an explicit-mask
reference, with and without context parallelism, and inside megatron's GPTModel."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_rlrt import parallel
from megatron_rlrt.packing import PackRow, pack_rows, zigzag_chunks, zigzag_index
from tests.helpers.dist_helpers_long import attention_inputs, dense_reference_attention


@pytest.mark.parametrize("block", [4, 512])
def test_packed_attention_equals_block_diagonal_mask_reference(block):
    from megatron_rlrt.models.packed_attention import packed_causal_attention

    lengths = [5, 13, 1, 9]
    q, k, v, w = attention_inputs(lengths)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = packed_causal_attention(*leaves, lengths, scale=0.3, block=block)
    ref = dense_reference_attention(*ref_leaves, lengths, 0.3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_zigzag_split_and_row_padding():
    assert zigzag_chunks(8, 2, 0) == [(0, 2), (6, 2)] and zigzag_chunks(8, 2, 1) == [(2, 2), (4, 2)]
    with pytest.raises(ValueError, match="multiple of 2 x context-parallel size 4"):
        zigzag_chunks(6, 2, 0)
    p = pack_rows([PackRow([1, 2, 3], [4, 5]), PackRow([6], [7, 8, 9], "teacher", 0)], segment_multiple=4)
    assert p.tokens.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0, 6, 7, 8, 9]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]]  # real positions, padding continues
    assert p.cu_seqlens.tolist() == [0, 8, 12]
    assert p.student_index.tolist() == [[2, 3, 0]] and p.teacher_index.tolist() == [[8, 9, 10]]
    both = sorted(zigzag_index(p.cu_seqlens, 2, 0).tolist() + zigzag_index(p.cu_seqlens, 2, 1).tolist())
    assert zigzag_index(p.cu_seqlens, 2, 0).tolist() == [0, 1, 6, 7, 8, 11] and both == list(range(12))


@pytest.fixture(scope="module")
def cp2_checks(tiny_models, tmp_path_factory):
    """One start of two ranks for both CP=2 checks below: (attention results per rank, model results)."""
    from tests.helpers.dist_helpers_long import cp2_checks_rank

    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(0, 151_000, (n,), generator=g).tolist()

    rows = [(ids(6), ids(23)), (ids(3), ids(2)), (ids(9), ids(40))]
    tmp = tmp_path_factory.mktemp("cp2")
    parallel.spawn(cp2_checks_rank, 2, ([8, 4, 20, 12], 3, str(tmp / "cp.json")),
                   (tiny_models["gqa"], 1, 2, rows, str(tmp / "model.json")))
    return json.loads((tmp / "cp.json").read_text()), json.loads((tmp / "model.json").read_text())


@pytest.mark.slow  # two ranks (shared start)
def test_context_parallel_attention_equals_reference_on_two_ranks(cp2_checks):
    for rank in cp2_checks[0]:
        assert rank["out"] < 1e-12, rank
        assert max(rank["grads"]) < 1e-12, rank


@pytest.mark.slow  # two ranks (shared start)
def test_megatron_packed_forward_at_context_parallel_equals_cp1_and_hf(cp2_checks):
    """GQA tiny Qwen3 through GPTModel with the packed THD input, zigzag over CP=2 ranks (TP=1):
    per-token log-probs equal the CP=1 run (1e-5) and Hugging Face's per-row forward; parameter
    gradients summed over CP equal CP=1's (1e-5 relative)."""
    res = cp2_checks[1]
    assert res["logprob_max_abs_diff"] < 1e-5, res
    assert res["grad_max_rel_diff"] < 1e-5 and res["grad_norm"] > 0, res
    assert res["hf_max_abs_diff"] < 1e-4, res


def test_recompute_flags_give_the_same_gradients(tiny_models, tmp_path):
    """--recompute-granularity full (uniform 1 / 2 layers, block 3) and selective: megatron takes its
    checkpointed path (counted) and log-probs and gradients equal the run without recompute."""
    from tests.helpers.dist_helpers_long import recompute_rank

    g = torch.Generator().manual_seed(4)
    rows = [(torch.randint(0, 151_000, (5,), generator=g).tolist(), torch.randint(0, 151_000, (30,), generator=g).tolist())
            for _ in range(2)]
    out = tmp_path / "recompute.json"
    parallel.spawn(recompute_rank, 1, tiny_models["gqa"], rows, str(out))  # 4 layers
    res = json.loads(out.read_text())
    assert res["none"]["checkpoint_calls"] == 0
    # uniform 1 -> 4 checkpoints, uniform 2 -> 2, block 3 -> 3, selective -> one per layer's core attention
    expected = {"full_uniform_1": 4, "full_uniform_2": 2, "full_block_3": 3, "selective": 4}
    for name, calls in expected.items():
        assert res[name]["checkpoint_calls"] == calls, (name, res[name])
        assert res[name]["logprob_max_abs_diff"] < 1e-6, (name, res[name])
        assert res[name]["grad_max_rel_diff"] < 1e-6, (name, res[name])
