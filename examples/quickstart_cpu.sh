#!/usr/bin/env bash
# The README's first command: a real RLRT training run on a CPU (2 ranks, TP=2), from nothing.
#
#   1. set up .venv and build the C++ log-prob extension   (scripts/setup_env.sh)
#   2. a tiny random Qwen3 with the real Qwen3 tokenizer    (tools/make_tiny_qwen3.py)
#   3. reasoning-gym addition problems: RL prompts + held-out prompts, no question in both
#                                                            (tools/make_dataset.py)
#   4. a warm-up SFT on the RL prompts only, with partly wrong solutions, so the policy
#      starts right only about half of the time              (tools/warmup_sft.py)
#   5. RLRT on megatron-core, TP=2 on 2 processes, HF engine (examples/train_rlrt_qwen3.sh)
#   6. held-out accuracy before/after and the reward plot    (tools/report_run.py)
#
# The held-out prompts are in no training step (warm-up or RL): tests/test_quickstart_data.py
# checks that on the files this script builds. Seeded throughout, so a rerun on the same
# machine gives the same numbers (see README: what can still differ across machines).
#
# Environment:
#   OUT                     output folder (default outputs/quickstart); finished stages are
#                           reused when the script is run again, RL resumes from its last checkpoint
#   QUICKSTART_SFT_STEPS    warm-up SFT steps (default 2000)
#   QUICKSTART_DRY_RUN=1    build the data set only and print the other stages' commands (tests)
# Extra arguments go to the trainer, e.g. --advantage-estimator grpo or --train-iters 10.
# Warnings nobody can act on here (CUDA advice on a CPU, megatron's experimental-module notices,
# pip's notes) go to $OUT/logs/, not the console; MEGATRON_RLRT_SHOW_WARNINGS=1 shows them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/quickstart}
SFT_STEPS=${QUICKSTART_SFT_STEPS:-2000}
DRY_RUN=${QUICKSTART_DRY_RUN:-0}
PY=.venv/bin/python
start=$(date +%s)

# run CMD...: run a stage (or, in a dry run, print it as one shell-quoted line)
run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ "$DRY_RUN" = 1 ]; then
  PY=${PYTHON:-$PY}
  [ -x "$PY" ] || PY=python3
else
  bash scripts/setup_env.sh
fi
# reproducibility: one thread per rank, a fixed hash seed (set/dict order of strings), offline hub
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONHASHSEED=0
export HF_HUB_DISABLE_PROGRESS_BARS=1   # per-file weight-loading bars; our own progress lines stay
mkdir -p "$OUT/logs"
export MEGATRON_RLRT_NOISE_LOG=${MEGATRON_RLRT_NOISE_LOG:-$OUT/logs/warnings.log}

run_stage() {  # run_stage "what" CMD...: one progress line, then the command
  echo "[quickstart] $1"
  shift
  run "$@"
}

[ -d "$OUT/tiny-qwen3" ] || run_stage "tiny random Qwen3 -> $OUT/tiny-qwen3" \
  $PY tools/make_tiny_qwen3.py --output-dir "$OUT/tiny-qwen3" \
  --hidden-size 128 --intermediate-size 256 --num-hidden-layers 2 --num-attention-heads 4 \
  --num-key-value-heads 2 --head-dim 32

# the data set is built for real even in a dry run (seconds): the held-out test reads it.
# make_dataset drops every held-out row whose question is also an RL question.
TASK='{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"], "allow_parentheses": false, "allow_negation": false}'
if [ ! -f "$OUT/data/eval.jsonl" ]; then
  echo "[quickstart] reasoning-gym basic_arithmetic: RL prompts and held-out prompts -> $OUT/data"
  $PY tools/make_dataset.py reasoning-gym --task basic_arithmetic --size 150 --seed 1 \
    --config "$TASK" --instruction "Answer with <answer>N</answer>." --out "$OUT/data/train.jsonl" \
    --eval-size 200 --eval-out "$OUT/data/eval.jsonl"
fi

# the warm-up sees the RL prompts only: the held-out prompts stay out of every training step
[ -d "$OUT/tiny-qwen3-warm" ] || run_stage "warm-up SFT ($SFT_STEPS steps) on the RL prompts -> $OUT/tiny-qwen3-warm" \
  $PY tools/warmup_sft.py --hf-dir "$OUT/tiny-qwen3" \
  --data "$OUT/data/train.jsonl" --output-dir "$OUT/tiny-qwen3-warm" \
  --steps "$SFT_STEPS" --wrong-fraction 0.5

echo "[quickstart] RLRT: megatron-core TP=2 on 2 CPU processes -> $OUT/run"
# a free rendezvous port unless one is given (29500, torchrun's default, may be taken)
[ -n "${MASTER_PORT:-}" ] || [ "$DRY_RUN" = 1 ] || export MASTER_PORT=$($PY -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
NPROC_PER_NODE=2 run bash examples/train_rlrt_qwen3.sh \
  --hf-checkpoint "$OUT/tiny-qwen3-warm" --prompt-data "$OUT/data/train.jsonl" \
  --eval-data "$OUT/data/eval.jsonl" --eval-n-samples 4 --no-enable-thinking \
  --tensor-model-parallel-size 2 --advantage-estimator rlrt --rlrt-lambda 0.5 --rlrt-clip-eps 0.5 \
  --rollout-batch-size 8 --n-samples-per-prompt 8 --rollout-max-response-len 16 \
  --use-dynamic-batch-size --max-tokens-per-gpu 1024 \
  --train-iters 30 --lr 2e-4 --lr-warmup-iters 2 --eval-interval 10 --save "$OUT/run" --save-interval 10 "$@"

run $PY tools/report_run.py "$OUT/run"
[ "$DRY_RUN" = 1 ] || echo "quickstart finished in $(( $(date +%s) - start )) s (set-up included; warnings: $MEGATRON_RLRT_NOISE_LOG)"
