"""Device/backend detection and the ONLY place that adapts megatron-core to a CPU.

megatron-core is written for CUDA. On a machine without CUDA (our laptops and CI) it runs
unchanged except for a handful of hard-coded CUDA calls; this module patches exactly those,
at runtime, and only when CUDA is absent. Nothing here changes behaviour on a GPU.

What is patched (see ../shared/notes/megatron-on-cpu.md for the measurements):

1. ``torch.cuda.current_device/synchronize/current_stream/Stream/stream/get_rng_state/
   set_rng_state``: megatron uses them as ``device=`` arguments and for stream bookkeeping.
   On CPU they return ``cpu`` / no-ops / the CPU generator's state.
2. ``torch`` inside the modules in ``CUDA_STRING_MODULES``: those modules create tensors with
   ``device="cuda"`` (schedules' token counters, the grad-norm buffers, ...). Their module
   global ``torch`` is replaced by a proxy that maps the device string ``cuda`` to ``cpu``
   in tensor factories and ``autocast``; every other attribute is the real torch.
3. ``Tensor.type()`` string checks (``== 'torch.cuda.FloatTensor'``) in the optimizer
   constructors and in grad clipping, and ``Tensor.cuda()`` in the tied-embedding setup:
   the functions in ``SCOPED_FUNCTIONS`` run with ``Tensor.type()`` reporting CUDA type
   names for CPU tensors and ``Tensor.cuda()`` returning the tensor, for the call only.
4. ``megatron.core.transformer.moe.ops.paged_stash`` imports triton unconditionally; it is
   an MoE-only CUDA kernel module reached from ``pipeline_parallel.schedules``. Without
   triton a stub module with the same names is installed (its kernels raise if called).

The patch set is pinned to ``SUPPORTED_MEGATRON_CORE``; ``tests/test_platform.py`` re-reads
megatron's source and fails loudly when an upgrade adds or removes a hard-coded CUDA use in
the modules we touch, so the list here is kept exact.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import sys
import types
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

SUPPORTED_MEGATRON_CORE = "0.19."

# Modules whose source creates tensors with device="cuda" / autocast("cuda") on code paths
# that the trainer, conversion tools or tests reach. tests/test_platform.py checks this list
# against megatron's source.
CUDA_STRING_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
)

# Modules that also create CUDA tensors by name but only on paths a CPU run never takes
# (FSDP, FP8, CUDA graphs, MoE, inference, NCCL/NVSHMEM allocators). Listed so that the
# platform test can tell "known and unreached" from "new since the last upgrade".
CUDA_STRING_MODULES_UNREACHED_ON_CPU = {
    "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision": "Megatron-FSDP only",
    "megatron.core.distributed.fsdp.src.megatron_fsdp.param_and_grad_buffer": "Megatron-FSDP only",
    "megatron.core.fp8_utils": "FP8 needs Transformer Engine on a GPU",
    "megatron.core.full_cuda_graph": "CUDA graphs",
    "megatron.core.transformer.cuda_graphs": "CUDA graphs",
    "megatron.core.fusions.fused_indices_converter": "MoE fused kernel",
    "megatron.core.transformer.moe.moe_layer": "MoE (Qwen3-MoE is not supported yet)",
    "megatron.core.transformer.moe.paged_stash": "MoE paged stash",
    "megatron.core.transformer.moe.token_dispatcher": "MoE token dispatch",
    "megatron.core.inference.symmetric_memory": "inference engine (we roll out with HF/SGLang/vLLM)",
    "megatron.core.nccl_allocator": "NCCL user-buffer allocator",
    "megatron.core.optimizer.layer_wise_optimizer": "layer-wise optimizer (not used)",
    "megatron.core.pipeline_parallel.combined_1f1b": "EP/A2A-overlap schedule (MoE)",
    "megatron.core.pipeline_parallel.hybrid_cp_schedule": "hybrid context parallelism (GPU only)",
}

# (module, qualified attribute) of functions that compare Tensor.type() with CUDA names or
# call Tensor.cuda().
SCOPED_FUNCTIONS = (
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
)

PAGED_STASH_OPS = "megatron.core.transformer.moe.ops.paged_stash"


@dataclass(frozen=True)
class Platform:
    """What this process runs on."""

    device: torch.device
    backend: str  # torch.distributed backend
    has_transformer_engine: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


@functools.lru_cache(maxsize=None)
def has_transformer_engine() -> bool:
    """True when Transformer Engine's torch part imports (GPU images only)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # broken TE installs raise all sorts of errors
        logger.warning("transformer_engine is installed but does not import (%s); using local spec", exc)
        return False
    return True


def local_gpu_index(local_rank: int | None = None, visible: int | None = None) -> int:
    """This rank's GPU: ``LOCAL_RANK`` (torchrun: one rank per GPU). More ranks on a node than
    visible GPUs is refused here: two ranks on one GPU would fail later inside NCCL ("Duplicate GPU
    detected") or run out of memory, and colocated servers map GPU i to local rank i."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else int(local_rank)
    visible = torch.cuda.device_count() if visible is None else int(visible)
    if not 0 <= local_rank < visible:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this process sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most one rank per GPU "
            f"(torchrun --nproc-per-node <= {visible})")
    return local_rank


def detect() -> Platform:
    """The device and distributed backend this process should use."""
    if torch.cuda.is_available():
        return Platform(torch.device("cuda", local_gpu_index()), "nccl", has_transformer_engine())
    return Platform(torch.device("cpu"), "gloo", False)


def current_device() -> torch.device:
    """This process's device: ``Platform.device`` once ``parallel.initialize`` has selected it
    (``torch.cuda.set_device``), the CPU without CUDA. The one place that answers "where do my
    tensors go"; every caller asks here."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------------------
# CPU adaptation
# --------------------------------------------------------------------------------------

_applied = False


def _cpu_device(device):
    """Map a CUDA device spec to the CPU; leave everything else alone."""
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int):  # torch.cuda.current_device() style ordinals
        return "cpu"
    return device


class _CpuTorch(types.ModuleType):
    """``torch`` with device="cuda" mapped to the CPU in factories and autocast."""

    _FACTORIES = (
        "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
        "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
    )

    def __init__(self):
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, self._wrap_factory(getattr(torch, name)))
        self.autocast = self._autocast

    @staticmethod
    def _wrap_factory(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        return wrapped

    @staticmethod
    def _autocast(device_type, *args, **kwargs):
        return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


class _NullStream:
    """Stands in for torch.cuda.Stream on the CPU: every wait is already satisfied."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # megatron's RNG tracker saves/restores the "cuda" generator around TP-region dropout;
    # on CPU the CPU generator plays that role.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_tensor_methods():
    """``Tensor.type()`` (no arguments) reports CUDA type names; ``Tensor.cuda()`` is identity."""
    original, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = original, original_cuda


def _with_cuda_tensor_methods(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _cuda_tensor_methods():
            return fn(*args, **kwargs)

    wrapped.__megatron_rlrt_patched__ = True
    return wrapped


def _install_paged_stash_stub() -> None:
    """megatron's MoE paged-stash kernels import triton at module import; give a stub."""
    if PAGED_STASH_OPS in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(PAGED_STASH_OPS)
    stub.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*args, **kwargs):
        raise RuntimeError("MoE paged stash needs triton and a GPU")

    stub.paged_stash_copy_kernel = _unavailable
    stub.paged_stash_pop_kernel = _unavailable
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[PAGED_STASH_OPS] = stub


def _patch_scoped(module_name: str, qualname: str) -> None:
    owner = importlib.import_module(module_name)
    parts = qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    raw = vars(owner)[parts[-1]]
    fn = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    if getattr(fn, "__megatron_rlrt_patched__", False):
        return
    wrapped = _with_cuda_tensor_methods(fn)
    setattr(owner, parts[-1], type(raw)(wrapped) if isinstance(raw, (staticmethod, classmethod)) else wrapped)


def megatron_core_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def _patch_recompute_rng() -> None:
    """Activation recompute (tensor_parallel.checkpoint) saves and restores the "cuda" RNG state
    through megatron's own helpers (torch.cuda.random / default_generators, and a lazy call that
    never runs without CUDA): on CPU the CPU generator plays that role."""
    import megatron.core.tensor_parallel.random as rng

    def set_state(new_state, *args, **kwargs):
        torch.set_rng_state(new_state)
        return False

    rng._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    rng._set_cuda_rng_state = set_state


def _l2_norm_fp64(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for megatron's ``local_multi_tensor_l2_norm`` (its stand-in for amp_C/TE's
    ``multi_tensor_l2norm``): the global 2-norm of the tensors with the squares summed in float64,
    1M elements at a time (no float64 copy of a whole tensor)."""
    total = torch.zeros((), dtype=torch.float64)
    for tensor in (t for tensors in tensor_lists for t in tensors):
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), 1 << 20):
            total += flat[start : start + (1 << 20)].double().square().sum().cpu()
    return torch.tensor([float(total.sqrt())], dtype=torch.float), None


def _patch_grad_norm() -> None:
    """megatron's grad-norm fallback without Apex/TE (every CPU run) takes ``torch.norm`` of each
    float32 gradient, a float32 sum that on CPU drifts by ~5e-4 relative at a 151,936 x 96
    embedding -- and by a different amount for each TP split of it: why a TP=2 x CP=2 step
    reported a grad_norm 4e-5 away from one rank's while every gradient agreed (issue 15; the
    reduction groups were right: TP x PP, TP duplicates counted once). The GPU kernels reduce in
    blocks; here the squares are summed in float64."""
    import megatron.core.optimizer.clip_grads as clip_grads
    from megatron.core import utils

    if getattr(clip_grads, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _l2_norm_fp64


def apply_cpu_patches() -> None:
    """Adapt megatron-core to a CUDA-less process. Idempotent; a no-op when CUDA exists."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    _install_paged_stash_stub()
    found = megatron_core_version()
    if not found.startswith(SUPPORTED_MEGATRON_CORE):
        raise RuntimeError(
            f"megatron-core {found} is installed but the CPU adaptation in {__file__} is written "
            f"for {SUPPORTED_MEGATRON_CORE}x. Install the pinned version (pip install -c constraints.txt "
            "--no-deps --ignore-requires-python megatron-core==0.19.2) or re-check the patch list "
            "with tests/test_platform.py."
        )
    _patch_torch_cuda()
    proxy = _CpuTorch()
    for name in CUDA_STRING_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy
    for module_name, qualname in SCOPED_FUNCTIONS:
        _patch_scoped(module_name, qualname)
    # clip_grads binds the helper by name inside optimizer.py
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    if hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
        optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    _patch_recompute_rng()
    _patch_grad_norm()
    _applied = True
    logger.info("megatron-core %s adapted to CPU (gloo)", found)


# Start-up noise that says nothing actionable on our supported setups (CPU without TE/apex,
# GPTModel still being megatron's dense GPT, megatron's experimental MIMO module announcing itself
# on import). It goes to $MEGATRON_RLRT_NOISE_LOG (once per message and process) when set, else
# nowhere; MEGATRON_RLRT_SHOW_WARNINGS=1 shows it all on the console.
_KNOWN_NOISE = (
    r"Apex is not installed", r"Transformer Engine and Apex are not installed",
    r"Please use DTensor instead", r"The argument order of load has been changed",
    r"torch\.distributed is disabled, unavailable or uninitialized", r"full scope is deprecated",
    r"MimoModelConfig is experimental", r"MimoModel is experimental", r"ModalitySubmodules is experimental",
)
# megatron's advice to set CUDA_DEVICE_MAX_CONNECTIONS=1 (CUDA stream scheduling): meaningless on a CPU
_CPU_NOISE = (r"CUDA_DEVICE_MAX_CONNECTIONS",)
_NOISY_LOGGERS = ("megatron.core.models.gpt.gpt_model", "megatron.core.dist_checkpointing.strategies.torch",
                  "megatron.core.dist_checkpointing.strategies.async_utils")
_noise_filter: "_NoiseFilter | None" = None


class _NoiseFilter:
    """A ``warnings.showwarning`` that sends known noise to a log file (or drops it) and
    everything else to the original handler."""

    def __init__(self, patterns: tuple[str, ...], log_path: str | None, shown):
        import re

        self.pattern = re.compile("|".join(patterns))
        self.log_path = log_path
        self.shown = shown
        self.seen: set[str] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if not self.pattern.search(text):
            return self.shown(message, category, filename, lineno, file, line)
        if self.log_path and text not in self.seen:
            self.seen.add(text)
            import warnings

            rank = os.environ.get("RANK", "-")
            try:
                with open(self.log_path, "a") as f:
                    f.write(f"[pid {os.getpid()} rank {rank}] " + warnings.formatwarning(message, category, filename, lineno, line))
            except OSError:
                pass


def quiet_known_warnings(cpu: bool = False) -> None:
    """Route known start-up noise away from the console (see ``_KNOWN_NOISE``); ``cpu`` adds
    the CUDA-only advice. Idempotent."""
    global _noise_filter
    if os.environ.get("MEGATRON_RLRT_SHOW_WARNINGS") == "1":
        return
    import warnings

    patterns = _KNOWN_NOISE + (_CPU_NOISE if cpu else ())
    log_path = os.environ.get("MEGATRON_RLRT_NOISE_LOG") or None
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    if _noise_filter is not None and warnings.showwarning is _noise_filter:
        shown = _noise_filter.shown
    else:
        shown = warnings.showwarning
    _noise_filter = _NoiseFilter(patterns, log_path, shown)
    warnings.showwarning = _noise_filter
    for name in _NOISY_LOGGERS:
        logger_ = logging.getLogger(name)
        logger_.setLevel(logging.WARNING if log_path else logging.ERROR)
        if log_path and not any(getattr(h, "_rlrt_noise", False) for h in logger_.handlers):
            handler = logging.FileHandler(log_path)
            handler._rlrt_noise = True  # type: ignore[attr-defined]
            handler.setFormatter(logging.Formatter(f"[pid %(process)d rank {os.environ.get('RANK', '-')}] %(name)s: %(message)s"))
            logger_.addHandler(handler)
            logger_.propagate = False


def setup_megatron() -> Platform:
    """Detect the platform and make megatron-core importable and runnable on it."""
    quiet_known_warnings()
    platform = detect()
    quiet_known_warnings(cpu=not platform.is_cuda)
    _install_paged_stash_stub()
    if not platform.is_cuda:
        apply_cpu_patches()
    return platform
