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

# .venv-launch: NeMo-Run for examples/nemo_run/launch_rlrt.py and tests/test_launch_nemo_run.py, in its
# own venv (no torch; leptonai pins anyio<=4.9, which would downgrade httpx2/huggingface_hub here).
# ~50 s and ~540 MB once; a failure only warns (those tests then skip).
LAUNCH_VENV=${MEGATRON_RLRT_LAUNCH_VENV:-.venv-launch}
launch_pins=$(grep -E '^(nemo-run|leptonai)==' constraints.txt)
launch_want=$(echo "$launch_pins" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$LAUNCH_VENV/.megatron_rlrt_launch_installed" 2>/dev/null)" != "$launch_want" ]; then
  echo "[setup] installing $(echo $launch_pins) into $LAUNCH_VENV"
  if { [ -x "$LAUNCH_VENV/bin/python" ] || "$PY" -m venv "$LAUNCH_VENV"; } && \
     "$LAUNCH_VENV/bin/python" -m pip --disable-pip-version-check -q install -c constraints.txt $launch_pins 2>&1 \
       | { grep -v "is ignored: it is neither a file nor a directory" || true; }; then
    echo "$launch_want" > "$LAUNCH_VENV/.megatron_rlrt_launch_installed"
  else
    echo "[setup] WARNING: could not install NeMo-Run into $LAUNCH_VENV; the NeMo-Run launcher tests will skip" >&2
  fi
fi

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
