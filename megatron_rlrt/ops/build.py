"""Building the csrc/ extension: ahead of time (setup.py build_ext) or on first use (JIT).

Two ways, one set of sources and flags:

* ``MEGATRON_RLRT_BUILD_EXT=1 pip install -e .`` -> setup.py calls :func:`extension_for_setup`
  and builds ``megatron_rlrt.ops._C`` (a CUDAExtension when torch has CUDA, else a CppExtension).
* otherwise :func:`jit_load` compiles the same sources with torch.utils.cpp_extension + ninja on
  first use into a cache folder (``$MEGATRON_RLRT_EXT_DIR``, default
  ``~/.cache/megatron_rlrt/ext``) whose name hashes the sources (content and folder), flags,
  torch and Python versions, so a cached build is reused (~1 s) and never mixed up with another
  ISA, torch or checkout.

CPU kernels are written on ATen's ``Vectorized<float>``; its ISA is chosen at compile time with
the ``CPU_CAPABILITY`` macros that ATen itself uses, matching what torch dispatches to on this
machine (``torch.backends.cpu.get_cpu_capability()``; ``$MEGATRON_RLRT_CPU_CAPABILITY`` overrides,
e.g. ``AVX2`` when a wheel must run on older x86 CPUs).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import time
from typing import Any

import torch

EXT_NAME = "rlrt_ops"
_HERE = os.path.dirname(os.path.abspath(__file__))

def _find_csrc() -> str:
    """$MEGATRON_RLRT_CSRC, else the repository's csrc/ (source checkouts, editable installs),
    else the copy setup.py's build_py puts inside the package (wheels, plain installs)."""
    if os.environ.get("MEGATRON_RLRT_CSRC"):
        return os.environ["MEGATRON_RLRT_CSRC"]
    repo = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "csrc")
    packaged = os.path.join(_HERE, "csrc")
    return repo if os.path.isdir(repo) or not os.path.isdir(packaged) else packaged


CSRC_DIR = _find_csrc()
CPU_SOURCES = ("bindings.cpp", "logprobs_cpu.cpp")
CUDA_SOURCES = ("logprobs_cuda.cu",)
HEADERS = ("rlrt_ops.h", "logprobs_cuda_kernels.cuh")
# Architectures for ahead-of-time CUDA builds (A100, H100/H200) plus PTX for newer GPUs.
CUDA_ARCH_FLAGS = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)

# -ffp-contract=off: no silent FMA contraction, so the epilogue rounds exactly like torch's ops
_COMMON_CFLAGS = ["-O3", "-ffp-contract=off"]
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}
_CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr", "-DRLRT_WITH_CUDA"]


def source_paths(with_cuda: bool, relative_to: str | None = None) -> list[str]:
    names = list(CPU_SOURCES) + (list(CUDA_SOURCES) if with_cuda else [])
    paths = [os.path.join(CSRC_DIR, n) for n in names]
    if relative_to is not None:
        paths = [os.path.relpath(p, relative_to) for p in paths]
    return paths


def sources_present(with_cuda: bool = False) -> bool:
    return all(os.path.isfile(p) for p in source_paths(with_cuda) + [os.path.join(CSRC_DIR, h) for h in HEADERS])


def cpu_capability() -> str:
    """The vector ISA to compile the CPU kernels for: AVX512, AVX2 or DEFAULT."""
    forced = os.environ.get("MEGATRON_RLRT_CPU_CAPABILITY")
    if forced:
        if forced.upper() not in _ISA_FLAGS:
            raise ValueError(f"MEGATRON_RLRT_CPU_CAPABILITY={forced!r}; valid: {sorted(_ISA_FLAGS)}")
        return forced.upper()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap.startswith("AVX512"):
        return "AVX512"
    if cap.startswith("AVX2"):
        return "AVX2"
    return "DEFAULT"


def cxx_flags(capability: str, with_cuda: bool) -> list[str]:
    return _COMMON_CFLAGS + _ISA_FLAGS[capability] + (["-DRLRT_WITH_CUDA"] if with_cuda else [])


def nvcc_flags(arch_flags: list[str] | tuple[str, ...] = CUDA_ARCH_FLAGS) -> list[str]:
    return _CUDA_CFLAGS + list(arch_flags)


def aot_cuda_arch_flags() -> tuple[str, ...]:
    """Architectures of an ahead-of-time build: ``$TORCH_CUDA_ARCH_LIST`` when set (torch's
    BuildExtension turns it into -gencode flags, but only when we pass none), else sm_80/sm_90."""
    return () if os.environ.get("TORCH_CUDA_ARCH_LIST") else CUDA_ARCH_FLAGS


def cuda_toolchain() -> str | None:
    """Why a CUDA build is impossible here, or None when it is possible."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc/CUDA_HOME not found"
    return None


def compiler_problem() -> str | None:
    """Why no C++ build can happen here (missing compiler, ninja or sources), or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"compiler missing ({cxx} not on PATH)"
    if not sources_present():
        return f"csrc sources not found under {CSRC_DIR}"
    if _find_ninja() is None:
        return "ninja missing (pip install ninja)"
    return None


def _find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    candidates = [os.path.join(os.path.dirname(sys.executable), "ninja")]
    try:
        import ninja  # type: ignore

        candidates.insert(0, os.path.join(ninja.BIN_DIR, "ninja"))
    except Exception:
        pass
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _build_key(capability: str, with_cuda: bool, cuda_arch: list[str]) -> str:
    h = hashlib.sha256()
    for p in source_paths(with_cuda) + [os.path.join(CSRC_DIR, n) for n in HEADERS]:
        with open(p, "rb") as f:
            h.update(f.read())
    # CSRC_DIR too: ninja's build file names the sources by path, so two checkouts sharing one
    # build folder would each see the other's build as stale and recompile (a minute each time)
    h.update(repr((cxx_flags(capability, with_cuda), nvcc_flags(cuda_arch) if with_cuda else None,
                   torch.__version__, torch.version.cuda, sys.version_info[:2], platform.machine(),
                   os.path.realpath(CSRC_DIR))).encode())
    return h.hexdigest()[:12]


def build_dir_root() -> str:
    return os.environ.get("MEGATRON_RLRT_EXT_DIR", os.path.join(os.path.expanduser("~"), ".cache", "megatron_rlrt", "ext"))


def _local_cuda_arch() -> list[str]:
    """JIT on a GPU: compile for the local device only (halves the nvcc time)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []  # torch.utils.cpp_extension reads it
    major, minor = torch.cuda.get_device_capability()
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]


def _jit_target(capability: str, with_cuda: bool, cuda_arch: list[str]) -> tuple[str, str]:
    """(module name, build folder) of a JIT build; the name hashes everything the build depends on."""
    key = _build_key(capability, with_cuda, cuda_arch)
    name = f"{EXT_NAME}_{'cuda' if with_cuda else 'cpu'}_{capability.lower()}_{key}"
    return name, os.path.join(build_dir_root(), name)


def jit_cached(with_cuda: bool = False) -> bool:
    """Whether :func:`jit_load` would reuse a finished build (no compiling)."""
    if compiler_problem():
        return False
    name, build_dir = _jit_target(cpu_capability(), with_cuda, _local_cuda_arch() if with_cuda else [])
    return os.path.isfile(os.path.join(build_dir, name + ".so"))


def _prebuilt_present() -> bool:
    import importlib.util

    return importlib.util.find_spec("megatron_rlrt.ops._C") is not None


def prebuild(prefix: str = "") -> int:
    """Build (or find cached) the extension that :mod:`megatron_rlrt.ops.dispatch` will load, with a
    progress line, so that the first log-prob call of a run does not compile for a minute
    unannounced. Never fails: without a compiler the kernels fall back to torch (said here)."""
    if os.environ.get("MEGATRON_RLRT_OPS_BACKEND", "auto").strip().lower() == "torch" \
            or os.environ.get("MEGATRON_RLRT_OPS_JIT", "1") == "0":
        print(f"{prefix}C++ log-prob extension: not built (MEGATRON_RLRT_OPS_BACKEND=torch or MEGATRON_RLRT_OPS_JIT=0)")
        return 0
    if _prebuilt_present():
        print(f"{prefix}C++ log-prob extension: prebuilt megatron_rlrt.ops._C")
        return 0
    problem = compiler_problem()
    if problem:
        print(f"{prefix}C++ log-prob extension: cannot build ({problem}); the pure-torch kernels will be used")
        return 0
    with_cuda = torch.cuda.is_available() and cuda_toolchain() is None
    what = f"{'CUDA+' if with_cuda else ''}C++ log-prob extension ({cpu_capability()})"
    if not jit_cached(with_cuda):
        print(f"{prefix}building the {what}: once per source/torch version, ~1 min on 2 cores ...", flush=True)
    try:
        _, seconds, build_dir = jit_load(with_cuda=with_cuda)
    except Exception as exc:  # the trainer will fall back too, with the same reason
        first = next((line for line in str(exc).splitlines() if "error" in line.lower()), str(exc).strip()[:300])
        print(f"{prefix}C++ log-prob extension: build failed ({first}); the pure-torch kernels will be used")
        return 0
    how = f"loaded in {seconds:.1f} s" if seconds < 5 else f"built in {seconds:.0f} s"
    print(f"{prefix}{what}: {how} ({build_dir})")
    return 0


def jit_load(with_cuda: bool = False, verbose: bool = False) -> tuple[Any, float, str]:
    """Compile (or reuse) and import the extension. Returns (module, seconds, build dir).

    Raises on any failure; the caller (megatron_rlrt.ops.dispatch) turns that into a fallback.
    """
    from torch.utils import cpp_extension

    problem = compiler_problem()
    if problem:
        raise RuntimeError(problem)
    capability = cpu_capability()
    cuda_arch = _local_cuda_arch() if with_cuda else []
    name, build_dir = _jit_target(capability, with_cuda, cuda_arch)
    os.makedirs(build_dir, exist_ok=True)
    start = time.perf_counter()
    with ninja_on_path():
        module = cpp_extension.load(
            name=name,
            sources=source_paths(with_cuda),
            extra_cflags=cxx_flags(capability, with_cuda),
            extra_cuda_cflags=nvcc_flags(cuda_arch) if with_cuda else None,
            extra_include_paths=[CSRC_DIR],
            build_directory=build_dir,
            with_cuda=with_cuda,
            verbose=verbose,
        )
    return module, time.perf_counter() - start, build_dir


@contextlib.contextmanager
def ninja_on_path():
    """torch.utils.cpp_extension runs ``ninja`` from PATH; the pip package's binary may not be on it."""
    ninja = _find_ninja()
    old_path = os.environ.get("PATH", "")
    if ninja and shutil.which("ninja") is None:
        os.environ["PATH"] = os.path.dirname(ninja) + os.pathsep + old_path
    os.environ.setdefault("MAX_JOBS", "2")
    try:
        yield
    finally:
        os.environ["PATH"] = old_path


def extension_for_setup():
    """(Extension, cmdclass) for setup.py: ``megatron_rlrt.ops._C`` from csrc/.

    A CUDAExtension (CPU + CUDA kernels; sm_80/sm_90 or ``$TORCH_CUDA_ARCH_LIST``) when torch was
    built with CUDA and nvcc is found, else a CppExtension (CPU kernels only).
    """
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    root = os.path.dirname(CSRC_DIR)
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    capability = cpu_capability()
    kwargs = dict(
        name="megatron_rlrt.ops._C",
        sources=source_paths(with_cuda, relative_to=root),
        include_dirs=[CSRC_DIR],
    )
    if with_cuda:
        ext = CUDAExtension(extra_compile_args={"cxx": cxx_flags(capability, True), "nvcc": nvcc_flags(aot_cuda_arch_flags())},
                            **kwargs)
    else:
        ext = CppExtension(extra_compile_args={"cxx": cxx_flags(capability, False)}, **kwargs)
    return ext, {"build_ext": BuildExtension}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Build (or find cached) the csrc/ log-prob extension for this machine.")
    p.add_argument("--prebuild", action="store_true", help="build it now, with a progress line (scripts/setup_env.sh)")
    p.add_argument("--prefix", default="", help="text before each printed line")
    args = p.parse_args(argv)
    if not args.prebuild:
        p.print_help()
        return 0
    return prebuild(args.prefix)


if __name__ == "__main__":
    sys.exit(main())
