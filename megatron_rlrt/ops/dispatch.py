"""Which implementation of the log-prob kernels runs, decided once per process.

Order: a prebuilt ``megatron_rlrt.ops._C`` (setup.py build_ext), else a JIT build of csrc/ with
torch.utils.cpp_extension (cached, see build.py), else the pure-torch reference. Any failure of
the first two (no compiler, no ninja, a compile error, an incompatible prebuilt) logs one warning
and falls back; it never raises. ``$MEGATRON_RLRT_OPS_BACKEND`` forces a choice:

* ``auto`` (default): as above.
* ``torch``: never build; use the reference.
* ``cpp`` / ``cuda``: the extension must load (and have CUDA kernels for ``cuda``), else raise.

``$MEGATRON_RLRT_OPS_JIT=0`` forbids JIT builds (a prebuilt extension is still used).
The choice is logged once, at first use, on the ``megatron_rlrt.ops`` logger.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_rlrt.ops import build, reference

logger = logging.getLogger("megatron_rlrt.ops")

_CAPABILITY_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


@dataclass
class BackendInfo:
    name: str  # "cuda", "cpp" or "torch"
    reason: str  # one line: why this one
    module: Optional[Any] = None  # the extension module when name != "torch"


_INFO: Optional[BackendInfo] = None
_LOCK = threading.Lock()


def _requested() -> str:
    want = os.environ.get("MEGATRON_RLRT_OPS_BACKEND", "auto").strip().lower()
    if want not in ("auto", "torch", "cpp", "cuda"):
        raise ValueError(f"MEGATRON_RLRT_OPS_BACKEND={want!r}; valid: auto, torch, cpp, cuda")
    return want


def _prebuilt(want_cuda: bool) -> tuple[Optional[Any], str]:
    try:
        module = importlib.import_module("megatron_rlrt.ops._C")
    except ImportError:
        return None, "no prebuilt extension"
    cap = module.cpu_capability()
    here = build.cpu_capability()
    if _CAPABILITY_RANK.get(cap, 9) > _CAPABILITY_RANK.get(here, 0):
        return None, f"prebuilt extension is {cap} but this CPU runs {here}"
    if want_cuda and not module.with_cuda():
        return None, "prebuilt extension has no CUDA kernels"
    return module, f"prebuilt extension megatron_rlrt.ops._C ({cap}{', CUDA' if module.with_cuda() else ''})"


def _select() -> BackendInfo:
    want = _requested()
    if want == "torch":
        return BackendInfo("torch", "MEGATRON_RLRT_OPS_BACKEND=torch")
    want_cuda = torch.cuda.is_available() and want != "cpp"
    problems = []
    module, why = _prebuilt(want_cuda)
    if module is not None:
        return BackendInfo("cuda" if want_cuda else "cpp", why, module)
    problems.append(why)
    if os.environ.get("MEGATRON_RLRT_OPS_JIT", "1") == "0":
        problems.append("JIT builds disabled (MEGATRON_RLRT_OPS_JIT=0)")
    else:
        attempts = [True, False] if want_cuda else [False]
        for with_cuda in attempts:
            if with_cuda and build.cuda_toolchain():
                problems.append(f"no CUDA build: {build.cuda_toolchain()}")
                continue
            try:
                module, seconds, build_dir = build.jit_load(with_cuda=with_cuda)
            except Exception as exc:  # compiler missing, compile error, ...
                problems.append(f"{'CUDA' if with_cuda else 'C++'} build failed: {_one_line(exc)}")
                continue
            kind = "cuda" if with_cuda else "cpp"
            how = f"loaded in {seconds:.1f} s" if seconds < 5 else f"built in {seconds:.0f} s"
            reason = f"{'CUDA+C++' if with_cuda else 'C++'} extension ({module.cpu_capability()}) {how} ({build_dir})"
            if want_cuda and not with_cuda:
                reason += "; CUDA tensors use the torch reference because " + "; ".join(problems)
            return BackendInfo(kind, reason, module)
    message = "; ".join(problems)
    if want in ("cpp", "cuda"):
        raise RuntimeError(f"MEGATRON_RLRT_OPS_BACKEND={want} but the extension is unavailable: {message}")
    warnings.warn(f"megatron_rlrt.ops: using the torch reference ({message})", RuntimeWarning, stacklevel=3)
    return BackendInfo("torch", message)


def _one_line(exc: BaseException) -> str:
    """The most telling line of a build failure: the first compiler 'error:' line if any."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for pick in (lambda l: "error:" in l, lambda l: "error" in l.lower(), lambda l: True):
        hits = [line for line in text if pick(line)]
        if hits:
            return hits[0][:300]
    return type(exc).__name__


def info() -> BackendInfo:
    """The process-wide choice (built, loaded and logged on the first call)."""
    global _INFO
    if _INFO is None:
        with _LOCK:
            if _INFO is None:
                chosen = _select()
                log = logger.info if chosen.name != "torch" else logger.warning
                log("megatron_rlrt.ops backend: %s (%s)", chosen.name, chosen.reason)
                _INFO = chosen
    return _INFO


def backend() -> str:
    """'cuda', 'cpp' or 'torch': the implementation that runs for this machine's tensors."""
    return info().name


def kernels_for(x: torch.Tensor):
    """The kernel namespace (extension module or ``reference``) for a tensor's device and dtype."""
    chosen = info()
    if chosen.module is None or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return reference
    if x.is_cuda:
        return chosen.module if chosen.module.with_cuda() else reference
    if x.device.type != "cpu":
        return reference
    return chosen.module


def reset_for_tests() -> None:
    """Forget the choice so the next call selects again (tests only)."""
    global _INFO
    with _LOCK:
        _INFO = None
