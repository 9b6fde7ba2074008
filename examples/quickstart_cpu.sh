#!/usr/bin/env bash
# The README's first command: set up, then run the CPU quickstart end to end.
# (Foundation stage: make a tiny real-architecture Qwen3, convert it to a Megatron
#  TP=2 checkpoint and check logit parity at TP=2 and PP=2.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-outputs/quickstart}
PY=.venv/bin/python
mkdir -p "$OUT"
[ -d "$OUT/tiny-qwen3" ] || $PY tools/make_tiny_qwen3.py --output-dir "$OUT/tiny-qwen3"
[ -d "$OUT/tiny-qwen3-mcore" ] || $PY tools/convert_hf_to_megatron.py --hf-dir "$OUT/tiny-qwen3" \
    --output-dir "$OUT/tiny-qwen3-mcore" --tensor-model-parallel-size 2
$PY tools/compare_hf_megatron.py --hf-dir "$OUT/tiny-qwen3" --megatron-dir "$OUT/tiny-qwen3-mcore" \
    --pipeline-model-parallel-size 2
