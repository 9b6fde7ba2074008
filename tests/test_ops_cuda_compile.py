"""nvcc compiles csrc/logprobs_cuda.cu for sm_80 and sm_90 (no GPU needed; nothing is linked or run).

~35 s when the CUDA sources changed; a pass is remembered per source/flag hash under the ops build
cache, so unchanged sources cost nothing. Skipped where nvcc is absent. The same check runs
standalone as tests/gpu/compile_check.sh.
"""

import os
import shutil

import pytest

from megatron_rlrt.ops import build


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    stamp = os.path.join(build.build_dir_root(), "nvcc_check", build.nvcc_check_key() + ".ok")
    if os.path.exists(stamp):
        return  # these exact sources and flags compiled before
    seconds = build.nvcc_compile_check(str(tmp_path))
    assert os.path.getsize(tmp_path / "logprobs_cuda.o") > 0
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, "w") as f:
        f.write(f"{seconds:.1f}\n")
