"""What only the CUDA kernels have, run under the CPU emulation of the CUDA thread model
(tests/cuda_emu/; the shared op tests in test_ops_logprobs.py, test_ops_epilogue.py and
test_ops_tp.py run them too, as the ``cuda_emu`` implementation): the epilogue's grid-stride loop
when the grid is capped, and rows whose 16-byte alignment differs between the logits and the
gradient buffer (vector-pack path for some rows, element path for others)."""

from __future__ import annotations

import pytest
import torch

from megatron_rlrt.algorithms import token_advantages
from megatron_rlrt.ops import logprobs, reference
from tests.helpers.dist_helpers_ops import cuda_emu_backend, make_logits, ops_impl


@pytest.fixture(scope="module")
def emu():
    ops_impl("cuda_emu")
    return cuda_emu_backend().module


@pytest.mark.parametrize("max_blocks", [1, 3])
def test_epilogue_grid_stride_loop_covers_every_token(emu, max_blocks):
    g = torch.Generator().manual_seed(0)
    batch, length = 5, 301  # 1505 tokens: 6 blocks of 256 threads uncapped
    student = -torch.rand(batch, length, generator=g) * 5
    teacher = (student + torch.randn(batch, length, generator=g) * 0.5).clamp(max=0)
    adv = torch.randn(batch, generator=g)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    mask = torch.arange(length)[None, :] < torch.tensor([301, 7, 256, 257, 100])[:, None]
    gate = rewards > 0.5
    want = token_advantages("rlrt", adv, rewards, student, teacher, mask, lam=0.5, eps_w=0.2)
    full = emu.epilogue(student, teacher, adv, gate, mask, 0.5, 0.2, False)
    capped = emu.epilogue(student, teacher, adv, gate, mask, 0.5, 0.2, False, max_blocks=max_blocks)
    assert torch.equal(capped, full)
    torch.testing.assert_close(capped, want, atol=1e-7, rtol=3e-7)  # exp() may differ by 1 ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_misaligned_rows_and_gradient_buffer(emu, dtype):
    n, vocab = 8, 1002
    logits, targets = make_logits(n, vocab + 1, seed=3)
    x = logits.to(dtype)[:, 1:]  # a view whose rows start 16-byte aligned (row 5) or not (the rest)
    assert {x[r].data_ptr() % 16 == 0 for r in range(n)} == {True, False}
    targets = targets % vocab
    stats = emu.stats(x, targets, 1.25, True)
    torch.testing.assert_close(stats, reference.stats(x, targets, 1.25, True), atol=2e-5, rtol=1e-5)

    norm, lp, ent = logprobs._finish(stats, 1.25, True)
    g_lp, g_ent = torch.randn(n, dtype=torch.float32), torch.randn(n, dtype=torch.float32)
    want = torch.empty_like(x.contiguous())
    reference.grad(x, targets, norm, g_lp, g_ent, ent, 1.25, want)
    out_aligned = torch.empty_like(x.contiguous())  # aligned buffer, misaligned input
    emu.grad(x, targets, norm, g_lp, g_ent, ent, 1.25, out_aligned)
    in_place_view = torch.empty(n, vocab + 1, dtype=dtype)[:, 1:]  # x's alignments, written over itself
    in_place_view.copy_(x)
    emu.grad(in_place_view, targets, norm, g_lp, g_ent, ent, 1.25, in_place_view)
    tol = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-4, rtol=2 ** -7),
           torch.float16: dict(atol=1e-5, rtol=2 ** -10)}[dtype]
    torch.testing.assert_close(out_aligned.double(), want.double(), **tol)
    assert torch.equal(in_place_view, out_aligned)
