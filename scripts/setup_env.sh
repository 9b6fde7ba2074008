#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with every pin from constraints.txt.
#   scripts/setup_env.sh            -> .venv with the package (editable) and test extras,
#                                      and the C++ log-prob extension built (cached) for this CPU
# Only what the training job needs: the NeMo-Run launcher venv is scripts/setup_launch_env.sh,
# the vLLM one scripts/setup_vllm_env.sh (scripts/run_tests.sh runs both).
# Idempotent: a second run only checks that everything is installed (seconds).
# pip's own output goes to $VENV/setup.log (its tail is printed if a step fails).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGATRON_RLRT_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
LOG="$VENV/setup.log"
# pip -q still prints environment notes (e.g. a --find-links location that does not exist):
# they go to the log, the console gets one line per step
pip_install() {
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$@" >>"$LOG" 2>&1; then
    echo "[setup] pip install $* failed; the end of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}

stamp="$VENV/.megatron_rlrt_installed"
want=$(cat constraints.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
else
  echo "[setup] installing dependencies (torch CPU wheel, megatron-core, transformers, ...; pip log: $LOG)"
  # torch first, pinned: any other spec pulls a multi-GB CUDA build.
  pip_install -c constraints.txt torch==2.13.0
  # megatron-core 0.19 says Requires-Python>=3.12 but is pure Python; pip on 3.11 would
  # otherwise silently pick 0.16.1.
  pip_install -c constraints.txt --no-deps --ignore-requires-python megatron-core==0.19.2
  pip_install -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
  echo "[setup] done: $("$VENV/bin/python" -W ignore -c "from megatron_rlrt.platform import setup_megatron; setup_megatron(); import torch, megatron.core, transformers; print(\"torch\", torch.__version__, \"| megatron-core\", megatron.core.__version__, \"| transformers\", transformers.__version__)")"
fi

# The C++ log-prob kernels (csrc/) compile once per source/torch/CPU-ISA combination into
# ~/.cache/megatron_rlrt/ext ($MEGATRON_RLRT_EXT_DIR); doing it here means the first training
# step does not silently spend a minute compiling. Reused in about a second afterwards.
"$VENV/bin/python" -c "from megatron_rlrt.ops.build import prebuild; prebuild('[setup] ')"
