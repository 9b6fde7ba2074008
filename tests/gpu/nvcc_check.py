"""nvcc on the CUDA sources without a GPU: compile csrc/logprobs_cuda.cu to an object and read
what the compiler's output says about speed (PTX global-memory instruction widths, ptxas
register spills). Used by tests/test_ops_cuda_compile.py and tests/gpu/compile_check.sh; the
build of the extension itself is megatron_rlrt/ops/build.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import torch

from megatron_rlrt.ops.build import CSRC_DIR, CUDA_ARCH_FLAGS, CUDA_SOURCES, HEADERS, nvcc_flags


def nvcc_compile_check(out_dir: str, arch_flags=CUDA_ARCH_FLAGS, timeout: float = 900) -> float:
    """Compile csrc/logprobs_cuda.cu to an object with nvcc (no GPU, no link): a CI check that the
    CUDA sources build for sm_80/sm_90. Works against a CPU-only torch: its wheel lacks one
    generated header (c10/cuda/impl/cuda_cmake_macros.h), for which a one-line stand-in is put
    in ``out_dir``. Also leaves in ``out_dir`` the PTX of each architecture (``*.ptx``) and
    ptxas's resource report (``ptxas.log``: registers, spills per kernel), read by
    :func:`ptx_global_memory_ops` and :func:`ptxas_spills`. Returns the seconds taken; raises
    RuntimeError with nvcc's output on failure.
    """
    import subprocess
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
    if not nvcc:
        raise FileNotFoundError("nvcc not found")
    os.makedirs(out_dir, exist_ok=True)
    includes = ["-I" + CSRC_DIR]
    torch_inc = include_paths()
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in torch_inc):
        stub = os.path.join(out_dir, "stub_include", "c10", "cuda", "impl")
        os.makedirs(stub, exist_ok=True)
        with open(os.path.join(stub, "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append("-I" + os.path.join(out_dir, "stub_include"))
    for p in list(torch_inc) + [sysconfig.get_paths()["include"]]:
        includes += ["-isystem", p]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    cmd = [nvcc, "-c", os.path.join(CSRC_DIR, CUDA_SOURCES[0]), "-o", os.path.join(out_dir, "logprobs_cuda.o"),
           "-std=c++20", "-Xcompiler", "-fPIC", abi, *nvcc_flags(arch_flags), *includes,
           "-Xptxas", "-v", "--keep", f"--keep-dir={out_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    with open(os.path.join(out_dir, "ptxas.log"), "w") as f:
        f.write(proc.stderr)
    return time.perf_counter() - start


def ptx_global_memory_ops(ptx: str) -> dict[str, dict[str, int]]:
    """{kernel entry: {global load/store instruction: count}} of a PTX file, e.g. to check that
    a kernel moves 128-bit vectors (``ld.global.nc.v4.u32``) where it should."""
    import collections
    import re

    found = {}
    for body in re.split(r"\n\.visible \.entry ", ptx)[1:]:
        name = body.split("(", 1)[0].strip()
        found[name] = dict(collections.Counter(re.findall(r"\b((?:ld|st)\.global[.\w]*)", body)))
    return found


def ptxas_spills(log: str) -> dict[str, tuple[int, int]]:
    """{kernel: (spill store bytes, spill load bytes)} from ``ptxas -v`` output (every arch)."""
    import re

    spills, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            old = spills.get(current, (0, 0))
            spills[current] = (max(old[0], int(m.group(1))), max(old[1], int(m.group(2))))
    return spills


def nvcc_check_key(arch_flags=CUDA_ARCH_FLAGS) -> str:
    """Hash of what the nvcc compile check depends on (sources, flags, torch headers' version)."""
    h = hashlib.sha256()
    for name in CUDA_SOURCES + HEADERS:
        with open(os.path.join(CSRC_DIR, name), "rb") as f:
            h.update(f.read())
    h.update(repr((nvcc_flags(arch_flags), torch.__version__, shutil.which("nvcc"))).encode())
    return h.hexdigest()[:16]
