"""megatron_rlrt.ops at TP=2 on gloo: against megatron-core's vocab_parallel_cross_entropy and the
float64 full-vocabulary reference (C++ kernels, CUDA kernels under the CPU emulation, torch),
with one collective in forward and none in backward."""

import json

import pytest

from megatron_rlrt import parallel
from megatron_rlrt.ops import build
from tests.helpers.dist_helpers_ops import cpp_backend, cuda_emu_backend, tp_logprobs_rank

pytestmark = pytest.mark.slow  # spawns ranks or servers: `-m "not slow"` skips it


@pytest.fixture(scope="module")
def built():
    if build.compiler_problem():
        pytest.skip(f"no C++ build possible here: {build.compiler_problem()}")
    # build in this process first, so the two ranks only load the cached builds
    cpp_backend()
    cuda_emu_backend()


def test_tp2_vs_megatron_and_float64(built, tmp_path):
    out = tmp_path / "tp.json"
    parallel.spawn(tp_logprobs_rank, 2, 2, str(out))
    r = json.loads(out.read_text())
    # megatron itself against float64: the yardstick for "same accuracy"
    assert r["megatron_vs_ref64"] < 1e-6 and r["megatron_grad_vs_ref64"] < 1e-6
    for impl in ("cpp", "cuda_emu", "torch"):  # cuda_emu: the CUDA kernels under the CPU emulation
        m = r[impl]
        assert len(m["fwd_collectives"]) == 1 and m["fwd_collectives"][0].startswith("all_gather_"), m
        assert m["bwd_collectives"] == [], m["bwd_collectives"]
        # log-prob differences are relative to max(1, |log p|): row 1 has logits ~ +-1e4
        assert m["lp_vs_megatron"] < 1e-6, m
        assert m["grad_vs_megatron"] < 1e-6, m
        assert m["lp_vs_ref64"] < 1e-6 and m["ent_vs_ref64"] < 1e-5, m
        assert m["grad_vs_ref64"] < 1e-6 and m["grad_t1_vs_ref64"] < 1e-6, m
        assert m["ranks_agree"] and m["repeat_bitwise"], m
        assert m["max_lp"] <= 0.0
        assert m["fused_lp_vs_ref64"] < 2e-5 and m["fused_ent_vs_ref64"] < 2e-5, m
        assert m["fused_grad_h_vs_ref64"] < 2e-5 and m["fused_grad_w_vs_ref64"] < 2e-5, m
        assert m["fused_unreduced_grad_h_matches"], m
