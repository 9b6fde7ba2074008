"""Backend selection of megatron_rlrt.ops: C++ when it builds, a warning and the torch reference
when it cannot (missing compiler, failed build), errors only when a backend is forced."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import types

import pytest
import torch

from megatron_rlrt.ops import build, dispatch, vocab_parallel_logprobs
from tests.helpers.dist_helpers_ops import make_logits, ref_logprobs_entropy


@pytest.fixture
def fresh(monkeypatch):
    """Forget the process-wide choice before and after the test."""
    saved = dispatch._INFO
    dispatch.reset_for_tests()
    monkeypatch.delenv("MEGATRON_RLRT_OPS_BACKEND", raising=False)
    monkeypatch.delenv("MEGATRON_RLRT_OPS_JIT", raising=False)
    yield monkeypatch
    dispatch._INFO = saved


def _values_still_right():
    logits, targets = make_logits(3, 500, seed=1)
    lp, _ = vocab_parallel_logprobs(logits, targets)
    torch.testing.assert_close(lp.double(), ref_logprobs_entropy(logits, targets)[0], atol=1e-5, rtol=0)


def test_missing_compiler_falls_back_with_a_warning(fresh, caplog):
    fresh.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.INFO, logger="megatron_rlrt.ops"):
        with pytest.warns(RuntimeWarning, match="compiler missing"):
            assert dispatch.backend() == "torch"
    assert "megatron_rlrt.ops backend: torch" in caplog.text and "compiler missing" in caplog.text
    _values_still_right()


def test_failed_build_falls_back_with_a_warning(fresh, tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None or build._find_ninja() is None:
        pytest.skip("no compiler/ninja: the build cannot even start here")
    src = tmp_path / "csrc"
    shutil.copytree(build.CSRC_DIR, src)
    for name in build.CPU_SOURCES:
        (src / name).write_text('#error "deliberately broken for the test"\n')
    fresh.setattr(build, "CSRC_DIR", str(src))
    fresh.setenv("MEGATRON_RLRT_EXT_DIR", str(tmp_path / "ext"))
    fresh.setattr(dispatch, "_prebuilt", lambda want_cuda: (None, "no prebuilt extension"))
    with pytest.warns(RuntimeWarning, match="C\\+\\+ build failed: .*deliberately broken"):
        assert dispatch.backend() == "torch"
    _values_still_right()


def test_forced_backend_raises_instead_of_falling_back(fresh):
    fresh.setenv("CXX", "/nonexistent/c++")
    fresh.setattr(dispatch, "_prebuilt", lambda want_cuda: (None, "no prebuilt extension"))
    fresh.setenv("MEGATRON_RLRT_OPS_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="MEGATRON_RLRT_OPS_BACKEND=cpp but the extension is unavailable"):
        dispatch.backend()
    dispatch.reset_for_tests()
    fresh.setenv("MEGATRON_RLRT_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="valid: auto, torch, cpp, cuda"):
        dispatch.backend()


def test_torch_backend_on_request_and_jit_off(fresh):
    fresh.setenv("MEGATRON_RLRT_OPS_BACKEND", "torch")
    assert dispatch.backend() == "torch"
    assert "MEGATRON_RLRT_OPS_BACKEND=torch" in dispatch.info().reason
    dispatch.reset_for_tests()
    fresh.delenv("MEGATRON_RLRT_OPS_BACKEND")
    fresh.setenv("MEGATRON_RLRT_OPS_JIT", "0")
    fresh.setattr(dispatch, "_prebuilt", lambda want_cuda: (None, "no prebuilt extension"))
    with pytest.warns(RuntimeWarning, match="JIT builds disabled"):
        assert dispatch.backend() == "torch"


def test_auto_builds_and_uses_cpp(fresh):
    if build.compiler_problem():
        pytest.skip(build.compiler_problem())
    assert dispatch.backend() == "cpp"
    assert "C++ extension" in dispatch.info().reason
    logits, _ = make_logits(2, 10, seed=2)
    assert dispatch.kernels_for(logits) is dispatch.info().module
    assert dispatch.kernels_for(logits.double()).__name__.endswith("reference")  # float64: reference
    _values_still_right()


def test_prebuild_announces_a_build_and_reuses_the_cache(fresh, tmp_path, capsys):
    """scripts/setup_env.sh's step: a progress line before compiling, one line when cached."""
    if build.compiler_problem():
        pytest.skip(build.compiler_problem())
    fresh.setattr(build, "_prebuilt_present", lambda: False)
    fresh.setattr(dispatch, "_prebuilt", lambda want_cuda: (None, "no prebuilt extension"))
    dispatch.backend()  # builds into (or loads from) the default cache, as the tests above do
    assert build.jit_cached()
    assert build.prebuild("[setup] ") == 0
    out = capsys.readouterr().out
    assert "building" not in out and "[setup] C++ log-prob extension" in out and "loaded in" in out
    fresh.setenv("MEGATRON_RLRT_EXT_DIR", str(tmp_path / "empty"))
    assert not build.jit_cached()
    calls = []
    fresh.setattr(build, "jit_load", lambda with_cuda=False: calls.append(with_cuda) or (None, 61.0, "somewhere"))
    assert build.prebuild("[setup] ") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[setup] building the C++ log-prob extension") and "built in 61 s" in out[1]
    assert calls == [False]
    fresh.setenv("CXX", "/nonexistent/c++")
    assert build.prebuild() == 0
    assert "cannot build (compiler missing" in capsys.readouterr().out


def test_prebuilt_extension_checks(fresh):
    fake = types.ModuleType("megatron_rlrt.ops._C")
    fake.cpu_capability = lambda: "AVX512"
    fake.with_cuda = lambda: False
    fresh.setitem(sys.modules, "megatron_rlrt.ops._C", fake)
    fresh.setattr(build, "cpu_capability", lambda: "AVX2")
    module, why = dispatch._prebuilt(want_cuda=False)
    assert module is None and "AVX512 but this CPU runs AVX2" in why
    fresh.setattr(build, "cpu_capability", lambda: "AVX512")
    module, why = dispatch._prebuilt(want_cuda=False)
    assert module is fake and "prebuilt" in why
    module, why = dispatch._prebuilt(want_cuda=True)
    assert module is None and "no CUDA kernels" in why


def test_extension_for_setup_describes_a_cpp_extension():
    ext, cmdclass = build.extension_for_setup()
    assert ext.name == "megatron_rlrt.ops._C"
    assert sorted(os.path.basename(s) for s in ext.sources) == ["bindings.cpp", "logprobs_cpu.cpp"]
    assert all(not os.path.isabs(s) for s in ext.sources)
    assert "build_ext" in cmdclass


def test_plain_install_ships_csrc_inside_the_package(tmp_path):
    """setup.py's build_py copies csrc/ into megatron_rlrt/ops/csrc, and build.py found outside
    the repository (as in site-packages) resolves its sources there."""
    import importlib.util
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lib = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=repo, check=True,
                   capture_output=True)
    shipped = sorted(p.name for p in (lib / "megatron_rlrt" / "ops" / "csrc").iterdir())
    assert shipped == sorted(os.listdir(os.path.join(repo, "csrc")))
    spec = importlib.util.spec_from_file_location("rlrt_build_installed", lib / "megatron_rlrt" / "ops" / "build.py")
    module = importlib.util.module_from_spec(spec)
    env = os.environ.pop("MEGATRON_RLRT_CSRC", None)
    try:
        spec.loader.exec_module(module)
    finally:
        if env is not None:
            os.environ["MEGATRON_RLRT_CSRC"] = env
    assert module.CSRC_DIR == str(lib / "megatron_rlrt" / "ops" / "csrc")
    assert module.sources_present(with_cuda=True)
