"""nvcc compiles csrc/logprobs_cuda.cu for sm_80 and sm_90 (no GPU needed; nothing is linked or run),
and what the compiler's output shows about speed without a GPU: every log-prob kernel moves rows
with 128-bit global loads (and the gradient with 128-bit stores), and no kernel spills registers.

~35 s when the CUDA sources changed; a pass is remembered per source/flag hash under the ops build
cache, so unchanged sources cost nothing. Skipped where nvcc is absent. The same compile runs
standalone as tests/gpu/compile_check.sh.
"""

import glob
import os
import shutil

import pytest

from megatron_rlrt.ops import build
from tests.gpu import nvcc_check

CHECK_VERSION = "2"  # bump when the assertions below change, so a remembered pass is redone


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    stamp = os.path.join(build.build_dir_root(), "nvcc_check", f"{nvcc_check.nvcc_check_key()}-v{CHECK_VERSION}.ok")
    if os.path.exists(stamp):
        return  # these exact sources and flags compiled and passed before
    seconds = nvcc_check.nvcc_compile_check(str(tmp_path))
    assert os.path.getsize(tmp_path / "logprobs_cuda.o") > 0

    ptx_files = sorted(glob.glob(str(tmp_path / "*.ptx")))
    assert len(ptx_files) >= 2, ptx_files  # compute_80 and compute_90
    for path in ptx_files:
        kernels = nvcc_check.ptx_global_memory_ops(open(path).read())
        stats = {k: v for k, v in kernels.items() if "stats_kernel" in k}
        grads = {k: v for k, v in kernels.items() if "grad_kernel" in k}
        assert len(stats) == 6 and len(grads) == 6, sorted(kernels)  # {fp32, bf16, fp16} x entropy
        for name, ops in stats.items():
            assert any(op.startswith("ld.global.nc.v4.") for op in ops), (path, name, ops)
        for name, ops in grads.items():
            assert any(op.startswith("ld.global.v4.") for op in ops), (path, name, ops)
            assert any(op.startswith("st.global.v4.") for op in ops), (path, name, ops)

    spills = nvcc_check.ptxas_spills((tmp_path / "ptxas.log").read_text())
    assert len(spills) >= 13, spills  # 6 stats + 6 grad + the epilogue
    assert all(v == (0, 0) for v in spills.values()), {k: v for k, v in spills.items() if v != (0, 0)}

    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, "w") as f:
        f.write(f"{seconds:.1f}\n")
