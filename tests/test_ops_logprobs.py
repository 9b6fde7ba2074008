"""megatron_rlrt.ops log-probs (C++ kernels, CUDA kernels under the CPU emulation, the torch reference) against independent references:
full-vocabulary float64 log_softmax + gather (values, entropy, gradients), the logits path for
the fused-linear path, and across simulated tensor-parallel layouts."""

from __future__ import annotations

import pytest
import torch

from megatron_rlrt.ops import dispatch, fused_linear_logprobs, logprobs, vocab_parallel_logprobs
from tests.helpers.dist_helpers_ops import make_logits, ops_impl, ref_logprobs_entropy, using

# cuda_emu: the CUDA kernels' own source under the CPU emulation of the CUDA thread model
IMPLS = ["cpp", "cuda_emu", "torch"]


@pytest.fixture(params=IMPLS)
def impl(request):
    ops_impl(request.param)  # build (or load the cached build) once; a failed build fails the test
    with using(request.param):
        yield request.param


def _tol_grad(dtype):
    # gradients come back in the logits dtype: bf16 keeps 8 bits, fp16 11
    return {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-4, rtol=2 ** -7),
            torch.float16: dict(atol=1e-5, rtol=2 ** -10)}[dtype]


def _check_against_ref(logits, targets, temperature, with_entropy, dtype):
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(targets.shape, generator=g), torch.randn(targets.shape, generator=g)
    x = logits.to(dtype).requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, targets, temperature, with_entropy=with_entropy)
    assert lp.dtype == torch.float32 and (ent is None) == (not with_entropy)
    obj = (lp * g_lp).sum() + ((ent * g_ent).sum() if with_entropy else 0)
    grad = torch.autograd.grad(obj, x)[0]
    assert grad.dtype == dtype

    rx = x.detach().double().requires_grad_()  # the same (rounded) inputs, in float64
    rlp, rent = ref_logprobs_entropy(rx, targets, temperature)
    robj = (rlp * g_lp).sum() + ((rent * g_ent).sum() if with_entropy else 0)
    rgrad = torch.autograd.grad(robj, rx)[0]

    scale = max(1.0, rlp.abs().max().item())
    torch.testing.assert_close(lp.double(), rlp.detach(), atol=2e-6 * scale, rtol=0)
    assert bool((lp <= 0).all()), lp.max()
    if with_entropy:
        torch.testing.assert_close(ent.double(), rent.detach(), atol=2e-6 * max(1.0, rent.max().item()), rtol=0)
        assert bool((ent >= 0).all())
    torch.testing.assert_close(grad.double(), rgrad.to(dtype).double(), **_tol_grad(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4099 + 4096])
def test_values_and_grads_vs_float64(impl, dtype, vocab):
    logits, targets = make_logits(6, vocab, seed=vocab)
    for temperature in (1.0, 0.6):
        for with_entropy in (False, True):
            _check_against_ref(logits, targets, temperature, with_entropy, dtype)


@pytest.mark.parametrize("vocab", [151_936, 262_144])
def test_big_vocab_rows_exact(impl, vocab):
    logits, targets = make_logits(3, vocab, seed=7, scale=3.0)
    logits[2, targets[2]] = logits[2].max() + 30  # one near-certain row
    _check_against_ref(logits, targets, 1.0, True, torch.float32)
    _check_against_ref(logits[:2], targets[:2], 0.7, False, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_extreme_logits(impl, dtype):
    vocab = 3000
    g = torch.Generator().manual_seed(2)
    logits = (torch.rand(6, vocab, generator=g) * 2 - 1) * 1e4
    targets = torch.randint(0, vocab, (6,), generator=g)
    logits[1] = 1e4  # all equal: log p = -log V
    logits[2, targets[2]] = 1e4  # target is (close to) the max
    logits[3, targets[3]] = -1e4  # target at the bottom: log p ~ -2e4, finite
    logits[4, :] = -1e4
    logits[4, targets[4]] = 1e4
    x = logits.to(dtype).requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, targets, 1.0, with_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert bool((lp <= 0).all()) and bool((ent >= 0).all())
    rlp, rent = ref_logprobs_entropy(x.detach(), targets)
    torch.testing.assert_close(lp.double(), rlp, atol=2e4 * 2e-7, rtol=0)
    torch.testing.assert_close(ent.double(), rent, atol=1e-5, rtol=0)
    assert lp[4].item() == 0.0  # exp(-2e4) vanishes: exactly 0, never above
    grad = torch.autograd.grad(lp.sum() + ent.sum(), x)[0]
    assert torch.isfinite(grad.float()).all()
    _check_against_ref(logits, targets, 1.0, True, dtype)


def test_neg_inf_logits_give_finite_results(impl):
    logits, targets = make_logits(4, 500, seed=4)
    logits[:, ::3] = float("-inf")  # e.g. a masked vocabulary tail
    targets = (targets // 3) * 3 + 1
    x = logits.requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, targets, 1.0, with_entropy=True)
    grad = torch.autograd.grad(lp.sum() + ent.sum(), x)[0]
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert bool((grad[:, ::3] == 0).all())
    rlp, rent = ref_logprobs_entropy(logits.detach(), targets)
    torch.testing.assert_close(lp.double(), rlp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), rent, atol=1e-5, rtol=0)


def test_nan_logit_poisons_only_its_own_row(impl):
    # a NaN anywhere in a row (the vector-pack part or the tail) must show, not be skipped by max()
    for vocab, col in ((1000, 0), (1000, 517), (1003, 1002)):
        logits, targets = make_logits(3, vocab, seed=vocab + col)
        logits[1, col] = float("nan")
        for dtype in (torch.float32, torch.bfloat16):
            x = logits.to(dtype).requires_grad_()
            lp, ent = vocab_parallel_logprobs(x, targets, 1.0, with_entropy=True)
            assert bool(lp[1].isnan()) and bool(ent[1].isnan()), (vocab, col, dtype)
            rlp, _ = ref_logprobs_entropy(logits[[0, 2]].to(dtype), targets[[0, 2]])
            torch.testing.assert_close(lp[[0, 2]].double(), rlp, atol=1e-5, rtol=0)


def test_logprobs_never_positive(impl):
    # dominant targets whose float rounding could give log p slightly above 0
    logits, targets = make_logits(64, 2048, seed=9, scale=1.0)
    logits[torch.arange(64), targets] = torch.linspace(15, 60, 64)
    for dtype in (torch.float32, torch.bfloat16):
        for temperature in (1.0, 0.3, 1.7):
            lp, _ = vocab_parallel_logprobs(logits.to(dtype), targets, temperature)
            assert bool((lp <= 0).all()), lp.max()


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_identical_across_tp_layouts(impl, tp):
    """Per-shard statistics merged as the all-gather would: equal to TP=1 up to fp32 rounding."""
    vocab = 151_936
    logits, targets = make_logits(4, vocab, seed=tp)
    logits[0] *= 2500  # logits ~ +-1e4
    kernels = dispatch.kernels_for(logits)
    for k in (1.0, 1 / 0.7):
        one = logprobs._finish(logprobs._merge(kernels.stats(logits, targets, k, True)[None], k), k, True)
        shard = vocab // tp
        parts = [kernels.stats(logits[:, r * shard:(r + 1) * shard].contiguous(),
                               logprobs._local_targets(targets, r * shard, shard), k, True) for r in range(tp)]
        many = logprobs._finish(logprobs._merge(torch.stack(parts), k), k, True)
        for a, b in zip(one[1:], many[1:]):  # log-probs and entropy
            torch.testing.assert_close(a, b, atol=2e-6 * max(1.0, a.abs().max().item()), rtol=0)
        torch.testing.assert_close(one[0][:, 0], many[0][:, 0], atol=0, rtol=0)  # the max: exact
        torch.testing.assert_close(one[0][:, 1], many[0][:, 1], atol=2e-6, rtol=0)  # log sum-exp


def test_deterministic_and_thread_count_independent(impl):
    logits, targets = make_logits(16, 20_000, seed=11)
    x = logits.requires_grad_()
    saved = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            lp, ent = vocab_parallel_logprobs(x, targets, 0.9, with_entropy=True)
            grad = torch.autograd.grad(lp.sum() + 0.1 * ent.sum(), x)[0]
            runs.append((lp, ent, grad))
    finally:
        torch.set_num_threads(saved)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_leading_dims_and_partial_outputs(impl):
    logits, targets = make_logits(12, 300, seed=12)
    x = logits.reshape(3, 4, 300).requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, targets.reshape(3, 4), with_entropy=True)
    assert lp.shape == (3, 4) and ent.shape == (3, 4)
    rlp, rent = ref_logprobs_entropy(x.detach().reshape(12, 300), targets)
    torch.testing.assert_close(lp.reshape(-1).double(), rlp, atol=1e-5, rtol=0)
    # only the entropy used, then only the log-probs used
    g_ent = torch.autograd.grad(ent.sum(), x, retain_graph=True)[0]
    g_lp = torch.autograd.grad(lp.sum(), x)[0]
    rx = logits.double().requires_grad_()
    a, b = ref_logprobs_entropy(rx, targets)
    torch.testing.assert_close(g_ent.reshape(12, 300).double(), torch.autograd.grad(b.sum(), rx, retain_graph=True)[0],
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_lp.reshape(12, 300).double(), torch.autograd.grad(a.sum(), rx)[0], atol=1e-6, rtol=1e-5)


def test_float64_inputs_use_float64_reference(impl):
    logits, targets = make_logits(5, 700, seed=13)
    x = logits.double().requires_grad_()
    lp, _ = vocab_parallel_logprobs(x, targets)
    rlp, _ = ref_logprobs_entropy(x.detach(), targets)
    torch.testing.assert_close(lp.double(), rlp, atol=1e-6, rtol=0)
    grad = torch.autograd.grad(lp.sum(), x)[0]
    assert grad.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_linear_matches_logits_path(impl, dtype):
    n, h, vocab = 10, 24, 1000
    g = torch.Generator().manual_seed(14)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(vocab, h, generator=g) / 2).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    outs = []
    for fused in (True, False):
        hid, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            lp, ent = fused_linear_logprobs(hid, w, targets, 0.8, with_entropy=True, chunk_size=128)
        else:
            lp, ent = vocab_parallel_logprobs(hid @ w.t(), targets, 0.8, with_entropy=True)
        gh, gw = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (hid, w))
        outs.append((lp, ent, gh, gw))
    (flp, fent, fgh, fgw), (llp, lent, lgh, lgw) = outs
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(flp, llp, **tol)
    torch.testing.assert_close(fent, lent, **tol)
    torch.testing.assert_close(fgh.float(), lgh.float(), **tol)
    torch.testing.assert_close(fgw.float(), lgw.float(), **tol)
    if dtype == torch.float32:  # and against float64 on the same inputs
        rh, rw = hidden.double().requires_grad_(), weight.double().requires_grad_()
        rlp, rent = ref_logprobs_entropy(rh @ rw.t(), targets, 0.8)
        rgh, rgw = torch.autograd.grad((rlp * g_lp).sum() + (rent * g_ent).sum(), (rh, rw))
        torch.testing.assert_close(flp.double(), rlp.detach(), atol=2e-5, rtol=0)
        torch.testing.assert_close(fgh.double(), rgh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fgw.double(), rgw, atol=1e-5, rtol=1e-5)


def test_fused_linear_chunk_size_does_not_change_results(impl):
    n, h, vocab = 6, 16, 777
    g = torch.Generator().manual_seed(15)
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(vocab, h, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    results = [fused_linear_logprobs(hidden, weight, targets, with_entropy=True, chunk_size=c) for c in (1, 100, 777, 4096)]
    for lp, ent in results[1:]:
        torch.testing.assert_close(lp, results[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, results[0][1], atol=1e-5, rtol=0)


def test_input_errors():
    logits, targets = make_logits(3, 50, seed=16)
    with pytest.raises(ValueError, match="targets must be global vocabulary ids"):
        vocab_parallel_logprobs(logits, torch.tensor([0, 50, 1]))
    with pytest.raises(ValueError, match="targets must be global vocabulary ids"):
        vocab_parallel_logprobs(logits, torch.tensor([0, -100, 1]))
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="must match"):
        vocab_parallel_logprobs(logits, targets[:2])
    with pytest.raises(ValueError, match="weight_shard"):
        fused_linear_logprobs(torch.randn(3, 8), torch.randn(50, 9), targets)


def test_inplace_backward_reuses_the_logits_buffer(impl):
    logits, targets = make_logits(5, 900, seed=17)
    base = logits.clone().requires_grad_()
    ref_lp, _ = vocab_parallel_logprobs(base, targets, 0.9)
    want = torch.autograd.grad(ref_lp.sum(), base)[0]
    x = logits.clone().requires_grad_()
    y = x * 1.0  # a non-leaf, like the LM head's output
    lp, _ = vocab_parallel_logprobs(y, targets, 0.9, inplace_backward=True)
    ptr = y.data_ptr()
    got = torch.autograd.grad(lp.sum(), x)[0]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.equal(y.detach(), logits)  # the logits buffer now holds the gradient
    assert y.data_ptr() == ptr
    # a second reader of the same logits fails loudly instead of reading gradients
    x2 = logits.clone().requires_grad_()
    y2 = x2 * 1.0
    other = y2.square().sum()  # saves y2
    lp2, _ = vocab_parallel_logprobs(y2, targets, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(lp2.sum() + other, x2)
    with pytest.raises(ValueError, match="leaf"):
        vocab_parallel_logprobs(logits.clone().requires_grad_(), targets, inplace_backward=True)
