"""The CPU adaptation of megatron-core: fails loudly when an upgrade changes what it patches."""

import importlib
import inspect
import re
import sys

import pytest
import torch

from megatron_rlrt import platform

CUDA_LITERAL = re.compile(r"""device\s*=\s*['"]cuda['"]|autocast\(\s*['"]cuda['"]""")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU adaptation is off when CUDA exists")


def _import_training_stack():
    """Everything the trainer, tools and tests import from megatron-core."""
    platform.setup_megatron()
    for name in ("megatron.core.models.gpt", "megatron.core.pipeline_parallel", "megatron.core.optimizer",
                 "megatron.core.distributed", "megatron.core.dist_checkpointing", "megatron.core.tensor_parallel",
                 "megatron.core.optimizer_param_scheduler", "megatron_rlrt.models.forward",
                 "megatron_rlrt.models.megatron_checkpoint", "megatron_rlrt.convert"):
        importlib.import_module(name)


def test_installed_megatron_core_is_the_supported_version():
    assert platform.megatron_core_version().startswith(platform.SUPPORTED_MEGATRON_CORE)


def test_every_patched_module_still_hard_codes_cuda():
    _import_training_stack()
    for name in platform.CUDA_STRING_MODULES:
        src = open(sys.modules[name].__file__, encoding="utf-8").read()
        assert CUDA_LITERAL.search(src), f"{name} no longer creates CUDA tensors by name: drop it from the patch list"


def test_no_new_module_hard_codes_cuda():
    """Any imported megatron module with device='cuda' must be patched or known unreached."""
    _import_training_stack()
    known = set(platform.CUDA_STRING_MODULES) | set(platform.CUDA_STRING_MODULES_UNREACHED_ON_CPU)
    found = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.startswith("megatron.core") and path and path.endswith(".py"):
            if CUDA_LITERAL.search(open(path, encoding="utf-8").read()):
                found.add(name)
    # megatron's experimental MIMO models are never on our path; they appear in sys.modules only
    # when an earlier test in the same process imported them (the full suite), not from the stack.
    found = {n for n in found if not n.startswith("megatron.core.models.mimo")}
    assert found - known == set(), f"megatron-core has new hard-coded CUDA uses in {sorted(found - known)}"
    assert known - found == set(), f"stale entries in platform.py: {sorted(known - found)}"


@pytest.mark.parametrize("module,qualname", platform.SCOPED_FUNCTIONS)
def test_scoped_functions_still_need_their_patch(module, qualname):
    _import_training_stack()
    owner = importlib.import_module(module)
    for part in qualname.split("."):
        owner = getattr(owner, part)
    fn = inspect.unwrap(owner)
    src = inspect.getsource(fn)
    assert "torch.cuda." in src and ".type()" in src or ".cuda()" in src, f"{module}.{qualname} changed"
    assert getattr(owner, "__megatron_rlrt_patched__", False), f"{module}.{qualname} is not wrapped"


def test_patched_torch_cuda_calls_target_the_cpu():
    _import_training_stack()
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
    state = torch.cuda.get_rng_state()
    a = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.rand(3).equal(a)
    # the proxy maps factory devices; CPU tensors report CUDA type names only inside scoped calls
    proxy = sys.modules["megatron.core.optimizer.clip_grads"].torch
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_grad_norm_on_cpu_sums_squares_in_float64():
    """megatron's own grad-norm function (get_grad_norm_fp32) with the CPU stand-in for amp_C/TE's
    multi_tensor_l2norm: equal to a float64 norm of the same float32 gradients, here a 151,936 x 96
    embedding-sized one (where megatron's float32 fallback drifts by ~1e-4)."""
    _import_training_stack()
    import megatron.core.optimizer.clip_grads as clip_grads

    assert clip_grads.l2_norm_impl is platform._l2_norm_fp64
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(151_936 * 96, generator=g) * 1e-9, torch.randn(64, 3, generator=g)]
    exact = sum(t.double().square().sum() for t in grads).sqrt().item()
    norm, _ = platform._l2_norm_fp64(0, None, [grads], False)
    assert abs(norm.item() / exact - 1) < 1e-6
    grads = [torch.randn(151_936 * 96, generator=g) * 1e-9]
    exact = grads[0].double().norm().item()
    import torch.distributed as dist

    from megatron_rlrt.parallel import free_port

    own = not dist.is_initialized()
    if own:  # a one-rank gloo group: get_grad_norm_fp32 all-reduces over its group
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        reported = clip_grads.get_grad_norm_fp32(grads, grad_stats_parallel_group=dist.new_group([0]))
    finally:
        if own:
            dist.destroy_process_group()
    assert abs(reported / exact - 1) < 1e-6


_NOISE_SCRIPT = r"""
import warnings
from megatron_rlrt.platform import setup_megatron
setup_megatron()
import megatron.core.models.mimo  # megatron announces its experimental MIMO config on import
from megatron.core.tensor_parallel import layers
# megatron's own CUDA-stream advice, from its own module (it fires from TP linear layers)
warnings.warn_explicit("When using async grad allreduce it is recommended to set the environment variable "
                       "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup", UserWarning, layers.__file__, 856)
warnings.warn("a warning the user should see")
"""


@pytest.mark.parametrize("log", [True, False])
def test_known_noise_goes_to_the_log_file_not_the_console(tmp_path, log):
    """Start-up warnings a CPU user cannot act on land once in $MEGATRON_RLRT_NOISE_LOG (or
    nowhere); every other warning still reaches the console."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("MEGATRON_RLRT_SHOW_WARNINGS", "PYTHONWARNINGS")}
    path = tmp_path / "logs" / "warnings.log"
    if log:
        env["MEGATRON_RLRT_NOISE_LOG"] = str(path)
    else:
        env.pop("MEGATRON_RLRT_NOISE_LOG", None)
    proc = subprocess.run([sys.executable, "-c", _NOISE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "a warning the user should see" in proc.stderr
    assert "MimoModelConfig" not in proc.stderr and "CUDA_DEVICE_MAX_CONNECTIONS" not in proc.stderr
    if log:
        text = path.read_text()
        assert text.count("MimoModelConfig is experimental") == 1
        assert text.count("CUDA_DEVICE_MAX_CONNECTIONS") == 1
        assert "a warning the user should see" not in text
    else:
        assert not path.exists()
    env["MEGATRON_RLRT_SHOW_WARNINGS"] = "1"
    proc = subprocess.run([sys.executable, "-c", _NOISE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert "MimoModelConfig" in proc.stderr and "CUDA_DEVICE_MAX_CONNECTIONS" in proc.stderr
