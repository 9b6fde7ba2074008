#!/usr/bin/env bash
# Create (or reuse) .venv-launch: NeMo-Run for examples/nemo_run/launch_rlrt.py and
# tests/test_launch_nemo_run.py. Only the NeMo-Run launcher needs it (the quickstart does not);
# scripts/run_tests.sh runs this.
#   scripts/setup_launch_env.sh     -> .venv-launch with nemo-run and leptonai pinned in constraints.txt
# Its own venv, no torch: leptonai pins anyio<=4.9, which would downgrade httpx/huggingface_hub
# in .venv. ~50 s and ~540 MB once; idempotent (a stamp). A failure only warns (exit 0; the
# launcher tests then skip). pip's output goes to $VENV/setup.log.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGATRON_RLRT_LAUNCH_VENV:-.venv-launch}
PY=${PYTHON:-python3}
pins=$(grep -E '^(nemo-run|leptonai)==' constraints.txt)
want=$(echo "$pins" | sha256sum | cut -d' ' -f1)
stamp="$VENV/.megatron_rlrt_launch_installed"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "[setup-launch] $VENV is up to date"
  exit 0
fi
echo "[setup-launch] installing $(echo $pins) into $VENV"
if { [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"; } && \
   "$VENV/bin/python" -m pip --disable-pip-version-check -q install -c constraints.txt $pins >>"$VENV/setup.log" 2>&1; then
  echo "$want" > "$stamp"
else
  echo "[setup-launch] WARNING: could not install NeMo-Run into $VENV (see $VENV/setup.log); the NeMo-Run launcher tests will skip" >&2
fi
