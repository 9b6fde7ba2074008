#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with every pin from constraints.txt.
#   scripts/setup_env.sh            -> .venv with the package (editable) and test extras
# Idempotent: a second run only checks that everything is installed (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGATRON_RLRT_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
stamp="$VENV/.megatron_rlrt_installed"
want=$(cat constraints.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
echo "[setup] installing dependencies (torch CPU wheel, megatron-core, transformers, ...)"
# torch first, pinned: any other spec pulls a multi-GB CUDA build.
"${PIP[@]}" install -c constraints.txt torch==2.13.0
# megatron-core 0.19 says Requires-Python>=3.12 but is pure Python; pip on 3.11 would
# otherwise silently pick 0.16.1.
"${PIP[@]}" install -c constraints.txt --no-deps --ignore-requires-python megatron-core==0.19.2
"${PIP[@]}" install -c constraints.txt -e ".[test]"
echo "$want" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -W ignore -c "from megatron_rlrt.platform import setup_megatron; setup_megatron(); import torch, megatron.core, transformers; print(\"torch\", torch.__version__, \"| megatron-core\", megatron.core.__version__, \"| transformers\", transformers.__version__)")"
