#!/usr/bin/env bash
# The README's first command: a real RLRT training run on a CPU (2 ranks, TP=2), from nothing.
#
#   1. set up .venv (scripts/setup_env.sh)
#   2. a tiny random Qwen3 with the real Qwen3 tokenizer        (tools/make_tiny_qwen3.py)
#   3. reasoning-gym addition problems: RL prompts + held-out  (tools/make_dataset.py)
#   4. a warm-up SFT on partly wrong solutions, so the policy
#      starts right only about half of the time              (tools/warmup_sft.py)
#   5. RLRT on megatron-core, TP=2 on 2 processes, HF engine   (examples/train_rlrt_qwen3.sh)
#   6. held-out accuracy before/after and the reward plot      (tools/report_run.py)
#
# OUT=outputs/quickstart by default; finished stages are reused when it is run again.
# Extra arguments go to the trainer, e.g. --advantage-estimator grpo or --train-iters 10.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-outputs/quickstart}
PY=.venv/bin/python
mkdir -p "$OUT"
start=$(date +%s)

[ -d "$OUT/tiny-qwen3" ] || $PY tools/make_tiny_qwen3.py --output-dir "$OUT/tiny-qwen3" \
  --hidden-size 128 --intermediate-size 256 --num-hidden-layers 2 --num-attention-heads 4 \
  --num-key-value-heads 2 --head-dim 32

TASK='{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"], "allow_parentheses": false, "allow_negation": false}'
[ -f "$OUT/data/eval.jsonl" ] || $PY tools/make_dataset.py reasoning-gym --task basic_arithmetic --size 150 --seed 1 \
  --config "$TASK" --instruction "Answer with <answer>N</answer>." --out "$OUT/data/train.jsonl" \
  --eval-size 200 --eval-out "$OUT/data/eval.jsonl"

# the warm-up sees every question (RL prompts and held-out ones), like pretraining would;
# RL then trains on the train questions only and is judged on the held-out ones
[ -d "$OUT/tiny-qwen3-warm" ] || $PY tools/warmup_sft.py --hf-dir "$OUT/tiny-qwen3" \
  --data "$OUT/data/train.jsonl" --data "$OUT/data/eval.jsonl" --output-dir "$OUT/tiny-qwen3-warm" \
  --steps 2000 --wrong-fraction 0.5

NPROC_PER_NODE=2 bash examples/train_rlrt_qwen3.sh \
  --hf-checkpoint "$OUT/tiny-qwen3-warm" --prompt-data "$OUT/data/train.jsonl" \
  --eval-data "$OUT/data/eval.jsonl" --eval-n-samples 4 --no-enable-thinking \
  --tensor-model-parallel-size 2 --advantage-estimator rlrt --rlrt-lambda 0.5 --rlrt-clip-eps 0.5 \
  --rollout-batch-size 8 --n-samples-per-prompt 8 --rollout-max-response-len 16 \
  --use-dynamic-batch-size --max-tokens-per-gpu 1024 \
  --train-iters 30 --lr 2e-4 --lr-warmup-iters 2 --eval-interval 10 --save "$OUT/run" --save-interval 10 "$@"

$PY tools/report_run.py "$OUT/run"
echo "quickstart finished in $(( $(date +%s) - start )) s (after set-up)"
