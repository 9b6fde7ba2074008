#!/usr/bin/env bash
# Compile the CUDA kernels with nvcc (sm_80 + sm_90) without a GPU, and the bindings with the
# CUDA entry points declared: the check that csrc/ builds for GPUs, from a CPU-only machine.
# ~35 s for nvcc + ~20 s for the bindings. Usage: bash tests/gpu/compile_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$PY" - "$out" <<'PYEOF'
import os, subprocess, sys, sysconfig
from torch.utils.cpp_extension import include_paths
from megatron_rlrt.ops import build
from tests.gpu import nvcc_check
out = sys.argv[1]
print(f"[compile_check] nvcc {build.CUDA_SOURCES[0]} for sm_80, sm_90 ...", flush=True)
print(f"[compile_check] nvcc ok in {nvcc_check.nvcc_compile_check(out):.0f} s", flush=True)
spills = nvcc_check.ptxas_spills(open(os.path.join(out, "ptxas.log")).read())
print(f"[compile_check] ptxas: {len(spills)} kernels, spilling: {[k for k, v in spills.items() if v != (0, 0)] or 'none'}")
for ptx in sorted(f for f in os.listdir(out) if f.endswith(".ptx")):
    ops = nvcc_check.ptx_global_memory_ops(open(os.path.join(out, ptx)).read())
    vec = sum(any(".v4." in op for op in o) for o in ops.values())
    print(f"[compile_check] {ptx}: {vec} of {len(ops)} kernels use 128-bit global loads/stores")
cmd = ["c++", "-c", os.path.join(build.CSRC_DIR, "bindings.cpp"), "-o", os.path.join(out, "bindings.o"), "-fPIC",
       "-std=c++20", "-DTORCH_EXTENSION_NAME=rlrt_ops_check", *build.cxx_flags(build.cpu_capability(), True)]
cmd += [f"-I{build.CSRC_DIR}"] + [f"-isystem{p}" for p in include_paths()] + [f"-isystem{sysconfig.get_paths()['include']}"]
subprocess.run(cmd, check=True)
print("[compile_check] bindings with RLRT_WITH_CUDA ok", flush=True)
PYEOF
