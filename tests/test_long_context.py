"""Long responses on CPU: the log-prob op of the no-grad and training passes never builds
[tokens, vocabulary] logits (fused-linear op on every device)."""

from __future__ import annotations

import pytest
import torch

from megatron_rlrt.trainer import logprobs as lp_mod
from megatron_rlrt.trainer.logprobs import LogprobRequest, fused_chunk_size, logprob_columns


@pytest.mark.parametrize("with_entropy", [False, True])
def test_cpu_logprob_columns_use_the_fused_linear_op_and_match_full_logits(monkeypatch, with_entropy):
    monkeypatch.setattr(lp_mod, "_tp", lambda: (None, 1, 0))

    def no_logits(*args, **kwargs):
        raise AssertionError("materialised [tokens, vocab/TP] logits on the log-prob path")

    monkeypatch.setattr(lp_mod, "shard_logits", no_logits)
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 1000
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    req = LogprobRequest(torch.arange(n), targets, temperature=0.7, with_entropy=with_entropy)
    cols = logprob_columns(hidden, weight, req)
    upstream = torch.randn(cols.shape, generator=g)
    (cols * upstream).sum().backward()

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logp_all = ((h64 @ w64.t()) / 0.7).log_softmax(-1)
    ref = [logp_all.gather(1, targets[:, None])[:, 0]]
    if with_entropy:
        ref.append(-(logp_all.exp() * logp_all).sum(-1))
    ref = torch.stack(ref, 1)
    torch.testing.assert_close(cols.double(), ref, rtol=0, atol=2e-5)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_fused_tiles_shrink_with_the_token_count():
    assert fused_chunk_size(100) == 4096
    assert fused_chunk_size(40_960) * 40_960 <= lp_mod.FUSED_TILE_ELEMENTS  # ~64 MB fp32 per tile at 2 x 20k
    assert fused_chunk_size(10**9) == 128
