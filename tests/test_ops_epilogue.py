"""megatron_rlrt.ops.rlrt_epilogue (C++ kernel, CUDA kernel under the CPU emulation, torch path) == megatron_rlrt.algorithms.token_advantages."""

from __future__ import annotations

import pytest
import torch

from megatron_rlrt.algorithms import token_advantages
from megatron_rlrt.ops import rlrt_epilogue
from tests.helpers.dist_helpers_ops import ops_impl, using


@pytest.fixture(params=["cpp", "cuda_emu", "torch"])
def impl(request):
    ops_impl(request.param)
    with using(request.param):
        yield request.param


def _batch(seed: int, batch: int = 12, length: int = 37, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = -torch.rand(batch, length, generator=g, dtype=torch.float64).mul(6).to(dtype)
    teacher = (student.double() + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.4).clamp(max=0).to(dtype)
    rewards = torch.randint(0, 2, (batch,), generator=g).float()
    adv = torch.randn(batch, generator=g)
    adv[:2] = 0.0  # zero-signal rows: sign(A) = 0
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    has_teacher = torch.rand(batch, generator=g) > 0.25
    # padding and rows without a teacher may hold garbage (NaN) that must not leak
    student = torch.where(mask, student, torch.full_like(student, float("nan")))
    teacher = torch.where(mask & has_teacher[:, None], teacher, torch.full_like(teacher, float("nan")))
    return student, teacher, adv, rewards, mask, has_teacher


@pytest.mark.parametrize("method", ["rlrt", "rlrt_all", "rlsd", "grpo"])
@pytest.mark.parametrize("lam,eps_w", [(0.5, 0.2), (1.0, 0.5), (0.3, 10.0), (0.0, 0.2)])
def test_epilogue_matches_token_advantages(impl, method, lam, eps_w):
    for seed, length in ((0, 37), (1, 16), (2, 1), (3, 257)):
        s, t, adv, rewards, mask, has_teacher = _batch(seed, length=length)
        for ht in (has_teacher, None):
            if ht is None:  # every row has a teacher view: it needs finite teacher log-probs
                t = torch.where(mask, torch.nan_to_num(t, nan=-1.0), t)
            want = token_advantages(method, adv, rewards, s, t, mask, lam, eps_w, ht)
            got = rlrt_epilogue(s, t, adv, rewards, mask, lam, eps_w, method, ht)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert torch.isfinite(got).all()
            # clipped weights and unweighted rows are bit-identical; exp() inside may differ by 1 ulp
            torch.testing.assert_close(got, want, atol=1e-7, rtol=3e-7)
            if impl == "torch":
                assert torch.equal(got, want)


def test_epilogue_bf16_and_float64_inputs(impl):
    for dtype in (torch.bfloat16, torch.float64):
        s, t, adv, rewards, mask, _ = _batch(4, dtype=dtype)
        t = torch.where(mask, torch.nan_to_num(t, nan=-1.0), t)
        want = token_advantages("rlrt", adv, rewards, s, t, mask, 0.5, 0.2)
        got = rlrt_epilogue(s, t, adv, rewards, mask, 0.5, 0.2, "rlrt")
        torch.testing.assert_close(got, want, atol=1e-7, rtol=3e-7)


def test_epilogue_validates_like_token_advantages(impl):
    s, t, adv, rewards, mask, has_teacher = _batch(5)
    bad = s.clone()
    bad[3, 0] = float("nan")  # a response position
    for fn in (token_advantages, None):
        with pytest.raises(ValueError, match="student_logprobs has 1 NaN"):
            if fn is None:
                rlrt_epilogue(bad, t, adv, rewards, mask, 0.5, 0.2, "rlrt", has_teacher)
            else:
                fn("rlrt", adv, rewards, bad, t, mask, 0.5, 0.2, has_teacher)
    with pytest.raises(ValueError, match="lam must be in"):
        rlrt_epilogue(s, t, adv, rewards, mask, 1.5, 0.2, "rlrt", has_teacher)
    with pytest.raises(ValueError, match="unknown method"):
        rlrt_epilogue(s, t, adv, rewards, mask, 0.5, 0.2, "nope", has_teacher)
