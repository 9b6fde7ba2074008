#!/usr/bin/env bash
# Everything the GPU machine checks, in one device call (see tests/gpu/README.md):
#   install the carried pure-Python wheels (.whl/), then check_ops (builds the CUDA extension,
#   correctness + benchmark), check_megatron (Qwen3 on megatron-core on CUDA vs HF, 2 bf16 RLRT
#   steps), check_sglang (SGLang if importable, else the HF/weight-sync path), check_fp8 (TE FP8
#   null-teacher D_t and RL steps vs bf16; "not run" without Transformer Engine), check_long_context (TE THD
#   32k-token packed forward vs the local spec's PackedCoreAttention; "not run" without TE). Results (json/md)
#   and one combined log go to $OUT (8 files: the device tool returns at most 8).
# Per-script time limits keep one hang from eating the others' time: OPS_S, MEGATRON_S, SGLANG_S, FP8_S.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-tests/gpu/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/gpu_run.log"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$LOG"; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  date -u; nvidia-smi -L; nproc
  python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" || true
} 2>&1 | tee -a "$LOG"
rc=0
step() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "===== $name (limit ${secs}s) =====" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$secs" "$@" 2>&1 | tee -a "$LOG"
  local r=${PIPESTATUS[0]}
  echo "===== $name: exit $r after $((SECONDS - t0))s =====" | tee -a "$LOG"
  [ "$r" = 0 ] || rc=1
}
step check_ops "${OPS_S:-240}" python3 tests/gpu/check_ops.py --out "$OUT"
step check_megatron "${MEGATRON_S:-150}" python3 tests/gpu/check_megatron.py --out "$OUT"
step check_sglang "${SGLANG_S:-100}" python3 tests/gpu/check_sglang.py --output "$OUT/check_sglang.json"
step check_fp8 "${FP8_S:-240}" python3 tests/gpu/check_fp8.py --out "$OUT"  # "not run" records without TE
step check_long_context "${LONG_S:-150}" python3 tests/gpu/check_long_context.py --stdout-only  # result in gpu_run.log; "not run" without TE
step check_weight_ipc "${IPC_S:-120}" env OUT="$OUT" python3 tests/gpu/check_weight_ipc.py  # torch only; + per-rank handles of 2 processes
exit $rc
