#!/usr/bin/env bash
# ATESD's motivation experiment: self-distillation with a FIXED teacher exposure
# rho in {0, 0.25, 0.5, 0.75, 1} (the teacher sees the first rho of its context's tokens),
# one run per rho, then one figure of teacher-student mismatch and reward across the runs
# ("mismatch grows with exposure"; "full exposure is not reliably the best").
#
#   examples/atesd_exposure_sweep.sh --config examples/recipes/qwen3_4b_base.yaml \
#       --hf-checkpoint /models/Qwen3-4B-Base --prompt-data /data/math.parquet
#
# Every argument goes to each run (examples/train_rlrt_qwen3.sh); the sweep adds
# --teacher-exposure fixed:RHO and --save $SWEEP_OUT/rhoRHO. Environment:
#   SWEEP_OUT      output folder (default runs/exposure-sweep)
#   RHOS           exposures to run (default "0 0.25 0.5 0.75 1")
#   SWEEP_METHOD   the self-distillation method (default opsd: reference-solution context)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${SWEEP_OUT:-runs/exposure-sweep}
RHOS=${RHOS:-0 0.25 0.5 0.75 1}
METHOD=${SWEEP_METHOD:-opsd}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
runs=()
for rho in $RHOS; do
  echo "[exposure-sweep] $METHOD, teacher exposure rho = $rho -> $OUT/rho$rho"
  examples/train_rlrt_qwen3.sh "$@" --advantage-estimator "$METHOD" --teacher-exposure "fixed:$rho" \
    --save "$OUT/rho$rho"
  runs+=("$OUT/rho$rho")
done
"$PYTHON" tools/plot_metrics.py "${runs[@]}" --keys teacher/mismatch loss/distill reward/mean eval/pass@1 \
  --labels $(for rho in $RHOS; do printf 'rho=%s ' "$rho"; done) --output "$OUT/exposure_sweep.png"
echo "[exposure-sweep] wrote $OUT/exposure_sweep.png"
