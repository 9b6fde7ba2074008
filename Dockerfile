# syntax=docker/dockerfile:1
# megatron-rlrt GPU image: the trainer (megatron-core, Transformer Engine, NVIDIA apex) and the SGLang
# rollout engine in ONE Python environment, plus this repository at /opt/megatron-rlrt with its csrc/
# extension prebuilt for sm_90 (H100/H200) and sm_100 (B200/GB200).
#
#   docker build -t megatron-rlrt:latest .
#   docker run --rm -it --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /models:/models -v /data:/data -v "$PWD/runs:/runs" megatron-rlrt:latest \
#       examples/train_rlrt_qwen3.sh --config examples/recipes/qwen3_8b_base.yaml \
#       --hf-checkpoint /models/Qwen3-8B-Base --prompt-data /data/dapo-math-17k.parquet --save /runs/rlrt
#
# Multi-node: Slurm + pyxis (examples/slurm/train_rlrt_qwen3.sbatch with CONTAINER_IMAGE, or
# examples/nemo_run/launch_rlrt.py --executor slurm --container-image); see docs/cluster.md.
#
# Base: NGC PyTorch 25.12 (Ubuntu 24.04, Python 3.12, CUDA 13.1, cuDNN, NCCL, HPC-X/UCX for
# InfiniBand). Why this tag: megatron-core 0.19 needs Python >= 3.12 (NGC >= 25.01); SGLang 0.5.23
# is a CUDA 13 stack (cuda-python>=13, flashinfer[cu13]) and its kernels need a CUDA 13 toolkit to
# match; 25.12's nvcc targets sm_90 and sm_100. SGLang pins torch==2.14.1, so NGC's torch
# (2.10.0a0) is REPLACED by that torch from the PyTorch cu130 index, and everything with C++/CUDA
# code (Transformer Engine's PyTorch extension, apex, csrc/) is compiled here against it. What NGC
# still gives: the CUDA toolkit and libraries, compilers, MPI/UCX and a tested OS. Hosts need an
# R580+ driver (CUDA 13). Bump the tag with --build-arg BASE_IMAGE=... .
# Every pip pin below must equal constraints.txt / setup.py (tests/test_docker.py checks them).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Architectures for every CUDA build below: Hopper and Blackwell (+PTX of sm_100 for newer GPUs).
# (DL3064 is hadolint mistaking TOKENIZERS_PARALLELISM for a secret.)
# hadolint ignore=DL3064
ENV TORCH_CUDA_ARCH_LIST="9.0;10.0+PTX" \
    NVTE_CUDA_ARCHS="90;100" \
    NVTE_FRAMEWORK=pytorch \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT="" \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false
ARG MAX_JOBS=16
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG APEX_COMMIT=6424da3b4faa6c8f062da4a48c424fff3f02d42d

# 1. Drop NGC's pip constraint file (it pins NGC's torch) and the packages compiled against NGC's
#    torch: they are rebuilt or reinstalled below against SGLang's torch.
RUN if [ -f /etc/pip/constraint.txt ]; then : > /etc/pip/constraint.txt; fi \
 && pip uninstall -y torch torchvision torchaudio torchao torch-tensorrt torch_tensorrt pytorch-triton \
        triton transformer-engine transformer_engine transformer-engine-cu12 transformer-engine-cu13 \
        transformer_engine_torch apex flash-attn flash_attn flash-attn-3 megatron-core nvidia-modelopt \
        xformers 2>&1 | grep -v "not installed" || true

# 2. torch + SGLang (the rollout engine) + sglang-router, resolved together; transformers and numpy
#    at the trainer's pins so the later steps do not move them.
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" \
        torch==2.14.1 sglang==0.5.23 sglang-router==0.3.2 transformers==5.19.0 "numpy<2.4" \
 && python -c "import torch, sglang; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| sglang', sglang.__version__)"

# 3. Transformer Engine: the core library wheel (cu13) and its PyTorch extension compiled against
#    the torch above (--no-build-isolation), for NVTE_CUDA_ARCHS.
RUN MAX_JOBS="${MAX_JOBS}" pip install --no-build-isolation "transformer-engine[pytorch,core_cu13]==2.20.2" \
 && python -c "import importlib.util as u; assert u.find_spec('transformer_engine_torch'), 'TE PyTorch extension missing'"

# 4. NVIDIA apex from source with its C++ and CUDA extensions (fused Adam, fused layer norm, ...),
#    never PyPI's unrelated "apex" package. Pinned by commit; TORCH_CUDA_ARCH_LIST picks the archs.
RUN git clone --filter=blob:none https://github.com/NVIDIA/apex.git /tmp/apex \
 && git -C /tmp/apex checkout "${APEX_COMMIT}" \
 && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 APEX_PARALLEL_BUILD=4 NVCC_APPEND_FLAGS="--threads 4" MAX_JOBS="${MAX_JOBS}" \
        pip install -v --no-build-isolation /tmp/apex \
 && rm -rf /tmp/apex \
 && python -c "import importlib.util as u; missing = [m for m in ('amp_C', 'fused_layer_norm_cuda', 'fused_adam_cuda') if not u.find_spec(m)]; assert not missing, missing"

# 5. megatron-core (pure Python; --no-deps keeps the torch above).
RUN pip install --no-deps megatron-core==0.19.2

# 6. This package's own dependencies, from setup.py + constraints.txt alone, so that editing code
#    does not redo them. constraints.txt pins the dev/CI CPU torch: the image keeps its torch.
WORKDIR /opt/megatron-rlrt
COPY setup.py README.md constraints.txt ./
RUN sed -e 's/^torch==.*/torch==2.14.1/' constraints.txt > /tmp/constraints-image.txt \
 && MEGATRON_RLRT_TORCH_SPEC=torch pip install -c /tmp/constraints-image.txt . \
 && pip uninstall -y megatron-rlrt

# 7. The csrc/ extension (megatron_rlrt.ops._C, CPU + CUDA kernels), built from csrc/ and
#    megatron_rlrt/ops/build.py alone so that other code changes reuse this layer. The Extension is
#    the one setup.py builds with MEGATRON_RLRT_BUILD_EXT=1 (build.extension_for_setup); it takes
#    its architectures from TORCH_CUDA_ARCH_LIST above (sm_90, sm_100 + PTX). AVX2 CPU kernels run
#    on any x86-64 host of a cluster (the prebuilt is refused on a CPU weaker than it was built for).
COPY csrc/ csrc/
COPY megatron_rlrt/ops/build.py megatron_rlrt/ops/build.py
RUN MEGATRON_RLRT_CPU_CAPABILITY=AVX2 MAX_JOBS="${MAX_JOBS}" \
    python -c "import importlib.util as u, setuptools; s = u.spec_from_file_location('rlrt_build', 'megatron_rlrt/ops/build.py'); b = u.module_from_spec(s); s.loader.exec_module(b); ext, cmd = b.extension_for_setup(); setuptools.setup(name='megatron-rlrt-ops', ext_modules=[ext], cmdclass=cmd, script_args=['build_ext', '--inplace'])" \
 && rm -rf build \
 && ls megatron_rlrt/ops/_C*.so

# 8. The code (seconds): an editable install, so megatron_rlrt.ops._C above stays in place.
COPY . .
RUN MEGATRON_RLRT_TORCH_SPEC=torch pip install --no-deps --no-build-isolation -e . \
 && python -c "import megatron_rlrt.ops.build as b, importlib.util as u; assert u.find_spec('megatron_rlrt.ops._C'); print('megatron-rlrt from', b.CSRC_DIR)"

# An unprivileged user (uid 1001; NGC images have "ubuntu" at 1000); JIT caches (Triton, the ops
# extension, HF) go to its home. Under Slurm/pyxis the job runs as the submitting user instead.
RUN useradd --create-home --shell /bin/bash --uid 1001 --user-group rlrt \
 && mkdir -p /opt/megatron-rlrt/runs && chown 1001:1001 /opt/megatron-rlrt/runs
USER 1001:1001
ENV HOME=/home/rlrt
