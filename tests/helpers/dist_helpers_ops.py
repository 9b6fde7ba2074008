"""Helpers for the megatron_rlrt.ops tests: the C++ build, float64 references, per-rank functions.

Rank functions live here (not in test files) so that spawned ranks can import them by name;
results travel back as JSON written by rank 0.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_rlrt import parallel
from megatron_rlrt.ops import build, dispatch


@functools.lru_cache(maxsize=None)
def cpp_backend() -> dispatch.BackendInfo:
    """The C++ extension, built here on first use (cached on disk). Raises if a build that should
    work fails; callers skip only when no compiler exists at all."""
    module, seconds, build_dir = build.jit_load()
    return dispatch.BackendInfo("cpp", f"test build ({seconds:.0f} s, {build_dir})", module)


CUDA_EMU_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_emu")


@functools.lru_cache(maxsize=None)
def cuda_emu_backend() -> dispatch.BackendInfo:
    """The CUDA kernels of csrc/logprobs_cuda_kernels.cuh run on CPU tensors under the emulation of
    the CUDA thread model in tests/cuda_emu/ (built on first use, cached on disk by source hash)."""
    from torch.utils import cpp_extension

    source = os.path.join(CUDA_EMU_DIR, "emulated_kernels.cpp")
    inputs = [source, os.path.join(CUDA_EMU_DIR, "cuda_emu.h")] + [os.path.join(build.CSRC_DIR, h) for h in build.HEADERS]
    key = hashlib.sha256(b"".join(open(p, "rb").read() for p in inputs) + torch.__version__.encode()).hexdigest()[:12]
    name = f"rlrt_cuda_emu_{key}"
    build_dir = os.path.join(build.build_dir_root(), name)
    os.makedirs(build_dir, exist_ok=True)
    with build.ninja_on_path():
        module = cpp_extension.load(name=name, sources=[source], extra_cflags=["-O2", "-ffp-contract=off"],
                                    extra_include_paths=[build.CSRC_DIR, CUDA_EMU_DIR], build_directory=build_dir)
    return dispatch.BackendInfo("cuda", "CUDA kernels under the CPU emulation (tests/cuda_emu)", module)


def backend_info(name: str) -> dispatch.BackendInfo:
    if name == "torch":
        return dispatch.BackendInfo("torch", "tests")
    if name == "cuda_emu":
        return cuda_emu_backend()
    return cpp_backend()


def ops_impl(name: str) -> None:
    """Build (or load) the named implementation for a test; skip only where no compiler exists."""
    if name in ("cpp", "cuda_emu"):
        problem = build.compiler_problem()
        if problem:
            import pytest

            pytest.skip(f"no C++ build possible here: {problem}")
        backend_info(name)  # a failed build fails the test


@contextmanager
def using(name: str):
    """Run the ops with the named implementation ("cpp", "cuda_emu" or "torch")."""
    saved = dispatch._INFO
    dispatch._INFO = backend_info(name)
    try:
        yield
    finally:
        dispatch._INFO = saved


def ref_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Full-vocabulary float64 log p(target) and entropy (differentiable)."""
    ls = torch.log_softmax(logits.double() / temperature, dim=-1)
    lp = ls.gather(-1, targets[..., None])[..., 0]
    p = ls.exp()
    ent = -(torch.where(p > 0, p * ls, torch.zeros_like(p))).sum(-1)
    return lp, ent


def make_logits(n: int, vocab: int, seed: int, scale: float = 4.0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * scale).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    return logits, targets


class CollectiveCounter:
    """Counts torch.distributed collectives issued while active."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
             "reduce_scatter", "broadcast", "all_to_all_single", "reduce")

    def __init__(self):
        self.calls: list[str] = []
        self._saved = {}

    def __enter__(self):
        for name in self.NAMES:
            orig = getattr(dist, name, None)
            if orig is None:
                continue
            self._saved[name] = orig

            def wrapped(*a, _orig=orig, _name=name, **k):
                self.calls.append(_name)
                return _orig(*a, **k)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(dist, name, orig)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _maxreldiff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, |b|): log-probs of ~-1e4 are float32 outputs with ulp ~1e-3."""
    return ((a.double() - b.double()).abs() / b.double().abs().clamp_min(1.0)).max().item()


def tp_logprobs_rank(tp: int, out_path: str) -> None:
    """At TP=tp: ours (cpp, cuda_emu and torch backends) vs megatron-core's vocab_parallel_cross_entropy
    vs the float64 full-vocab reference; values, gradients, collectives; the fused-linear path."""
    parallel.initialize(parallel.ParallelLayout(tensor_model_parallel_size=tp))  # CPU adaptation first
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    from megatron_rlrt.ops import fused_linear_logprobs, vocab_parallel_logprobs

    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    results: dict = {}
    n, vocab = 9, 4000
    full, targets = make_logits(n, vocab, seed=3)
    full[0, targets[0]] = 60.0  # a near-certain token: log p ~ -1e-20
    full[1] = full[1] * 2000.0  # logits ~ +-1e4
    shard_v = vocab // tp
    shard = full[:, rank * shard_v:(rank + 1) * shard_v]
    g_lp = torch.randn(n, generator=torch.Generator().manual_seed(5))
    g_ent = torch.randn(n, generator=torch.Generator().manual_seed(6))
    ref_x = full.double().requires_grad_()
    ref_lp, ref_ent = ref_logprobs_entropy(ref_x, targets, 0.8)
    ref_grad = torch.autograd.grad((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum(), ref_x)[0]
    ref_grad_shard = ref_grad[:, rank * shard_v:(rank + 1) * shard_v]

    # megatron-core (temperature 1): loss = -log p; it modifies its input in place, so give it a copy
    meg_x = shard.clone().requires_grad_()
    meg_in = meg_x.clone()
    meg_loss = vocab_parallel_cross_entropy(meg_in, targets)
    meg_grad = torch.autograd.grad((-meg_loss * g_lp).sum(), meg_x)[0]
    ref1_x = full.double().requires_grad_()
    ref1_lp, _ = ref_logprobs_entropy(ref1_x, targets, 1.0)
    ref1_grad = torch.autograd.grad((ref1_lp * g_lp).sum(), ref1_x)[0][:, rank * shard_v:(rank + 1) * shard_v]
    results["megatron_vs_ref64"] = _maxreldiff(-meg_loss.detach(), ref1_lp.detach())
    results["megatron_grad_vs_ref64"] = _maxdiff(meg_grad, ref1_grad)

    for impl in ("cpp", "cuda_emu", "torch"):
        with using(impl):
            x = shard.clone().requires_grad_()
            with CollectiveCounter() as fwd_calls:
                lp1, _ = vocab_parallel_logprobs(x, targets, 1.0, group)
            with CollectiveCounter() as bwd_calls:
                g1 = torch.autograd.grad((lp1 * g_lp).sum(), x)[0]
            x2 = shard.clone().requires_grad_()
            lp, ent = vocab_parallel_logprobs(x2, targets, 0.8, group, with_entropy=True)
            g2 = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), x2)[0]
            lp_again, ent_again = vocab_parallel_logprobs(shard, targets, 0.8, group, with_entropy=True)
            # fused linear: hidden [n, h] replicated, weight rows sharded; reference = full logits path
            h = 16
            gen = torch.Generator().manual_seed(11)
            hidden = torch.randn(n, h, generator=gen)
            weight = torch.randn(vocab, h, generator=gen) / 2
            hid = hidden.clone().requires_grad_()
            w_shard = weight[rank * shard_v:(rank + 1) * shard_v].clone().requires_grad_()
            flp, fent = fused_linear_logprobs(hid, w_shard, targets, 0.8, group, with_entropy=True, chunk_size=300)
            fg_h, fg_w = torch.autograd.grad((flp * g_lp).sum() + (fent * g_ent).sum(), (hid, w_shard))
            # reduce_hidden_grad=False leaves the TP reduction of the hidden gradient to the caller
            hid_local = hidden.clone().requires_grad_()
            flp2, fent2 = fused_linear_logprobs(hid_local, w_shard, targets, 0.8, group, with_entropy=True,
                                                chunk_size=300, reduce_hidden_grad=False)
            fg_h_local = torch.autograd.grad((flp2 * g_lp).sum() + (fent2 * g_ent).sum(), hid_local)[0]
            dist.all_reduce(fg_h_local, group=group)
            rh = hidden.double().requires_grad_()
            rw = weight.double().requires_grad_()
            rlp, rent = ref_logprobs_entropy(rh @ rw.t(), targets, 0.8)
            rg_h, rg_w = torch.autograd.grad((rlp * g_lp).sum() + (rent * g_ent).sum(), (rh, rw))
        gathered = [torch.empty_like(lp) for _ in range(tp)]
        dist.all_gather(gathered, lp.detach().contiguous(), group=group)
        results[impl] = {
            "fwd_collectives": fwd_calls.calls,
            "bwd_collectives": bwd_calls.calls,
            "lp_vs_megatron": _maxreldiff(lp1.detach(), -meg_loss.detach()),
            "grad_vs_megatron": _maxdiff(g1, meg_grad),
            "lp_vs_ref64": _maxreldiff(lp.detach(), ref_lp.detach()),
            "ent_vs_ref64": _maxdiff(ent.detach(), ref_ent.detach()),
            "grad_vs_ref64": _maxdiff(g2, ref_grad_shard),
            "grad_t1_vs_ref64": _maxdiff(g1, ref1_grad),
            "ranks_agree": all(torch.equal(gathered[0], t) for t in gathered),
            "repeat_bitwise": bool(torch.equal(lp.detach(), lp_again) and torch.equal(ent.detach(), ent_again)),
            "max_lp": lp.max().item(),
            "fused_lp_vs_ref64": _maxdiff(flp.detach(), rlp.detach()),
            "fused_ent_vs_ref64": _maxdiff(fent.detach(), rent.detach()),
            "fused_grad_h_vs_ref64": _maxdiff(fg_h, rg_h),
            "fused_grad_w_vs_ref64": _maxdiff(fg_w, rg_w[rank * shard_v:(rank + 1) * shard_v]),
            "fused_unreduced_grad_h_matches": bool(torch.allclose(fg_h_local, fg_h, atol=1e-6, rtol=1e-6)),
        }
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    parallel.destroy()
