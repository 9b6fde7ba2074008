#!/usr/bin/env bash
# Install everything the tests need (.venv, .venv-launch for the NeMo-Run launcher tests, .venv-vllm)
# and run the CPU test suite.
# Extra arguments go to pytest, e.g. scripts/run_tests.sh -k parity
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/setup_launch_env.sh  # .venv-launch for tests/test_launch_nemo_run.py (a failure warns, tests skip)
bash scripts/setup_vllm_env.sh || [ $? -eq 3 ]  # .venv-vllm for tests/test_vllm_engine.py (exit 3: no PyPI, tests skip)
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest tests "$@"
