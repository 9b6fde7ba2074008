#!/usr/bin/env bash
# The fidelity study (issue 17, docs/fidelity.md): GRPO, RLRT (eps_w 1.0 and 0.2), RLRT-all,
# RLSD and GRPO + entropy bonus on the same warm-up model, data, budget and seeds; then
# held-out avg@k / pass@k of every final checkpoint and one comparison report.
#
#   bash examples/fidelity/run_study.sh --quick          # smoke size: 1 seed, 5 steps of 4 x 8 rollouts
#   bash examples/fidelity/run_study.sh                  # the study: 3 seeds, 30 steps of 4 x 8 rollouts (~2 h on 2 cores)
#   bash examples/fidelity/run_study.sh --seeds "1 2" --steps 20 --methods "grpo rlrt_eps1"
#
# Stages (each skipped when its output exists, so a rerun resumes; an interrupted RL run
# resumes from its last checkpoint):
#   1. tiny Qwen3 (hidden 128, 4 layers, real tokenizer)            $OUT/setup/tiny-qwen3
#   2. three-term additions: 300 RL prompts, 84 held-out prompts     $OUT/setup/data
#      (no held-out question in the RL set: make_dataset drops them)
#   3. warm-up SFT on the RL prompts only, student + teacher views   $OUT/setup/tiny-qwen3-warm
#      (tools/warmup_sft.py --task strategies; megatron_rlrt/data/strategy_task.py)
#   4. the step-0 teacher check (does the teacher view help?)      $OUT/teacher_view_check.json
#   5. every method x seed: RL with megatron-core, TP=2 on 2 processes  $OUT/runs/<method>-s<seed>
#   6. held-out evaluation of each final checkpoint and the warm-up  $OUT/runs/*/eval, $OUT/step0/eval
#   7. tools/compare_runs.py: table + figures                        $OUT/report
#
# Options:
#   --quick            1 seed, 5 RL steps of 4 prompts x 8 samples, evaluation on 24 held-out problems x 8
#   --out DIR          study directory (default outputs/fidelity-study, or outputs/fidelity-quick with --quick)
#   --seeds "S ..."    RL seeds (default "1 2 3"; --quick "1")
#   --steps N          RL steps per run (default 30; --quick 5)
#   --methods "M ..."  subset of: rlrt_eps1 grpo rlrt_all rlsd grpo_eb rlrt_eps02 (default: all, in this order)
#   --eval-n N         samples per held-out problem for pass@k (default 16; --quick 8)
#   --eval-problems N  held-out problems evaluated (default all 84; --quick 24); the teacher check uses
#                      at most 40
#   --prompts N        prompts per RL step, 8 samples each (default 4; --quick 4)
#   --sft-steps N      warm-up SFT steps (default 1500: the step-0 teacher check passes from there; 450 did not)
# Every method gets the same settings (lr 2e-4, --prompts prompts x 8 samples per step, temperature 1,
# responses up to 64 tokens); only its own --advantage-estimator and method flags differ (method_args below).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

QUICK=0 OUT="" SEEDS="" STEPS="" METHODS="rlrt_eps1 grpo rlrt_all rlsd grpo_eb rlrt_eps02" EVAL_N="" EVAL_PROBLEMS="" PROMPTS="" SFT_STEPS=1500
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT=$2; shift ;;
    --seeds) SEEDS=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --methods) METHODS=$2; shift ;;
    --eval-n) EVAL_N=$2; shift ;;
    --eval-problems) EVAL_PROBLEMS=$2; shift ;;
    --prompts) PROMPTS=$2; shift ;;
    --sft-steps) SFT_STEPS=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then
  OUT=${OUT:-outputs/fidelity-quick}; SEEDS=${SEEDS:-1}; STEPS=${STEPS:-5}; EVAL_N=${EVAL_N:-8}; EVAL_PROBLEMS=${EVAL_PROBLEMS:-24}; PROMPTS=${PROMPTS:-4}
else
  OUT=${OUT:-outputs/fidelity-study}; SEEDS=${SEEDS:-"1 2 3"}; STEPS=${STEPS:-30}; EVAL_N=${EVAL_N:-16}; EVAL_PROBLEMS=${EVAL_PROBLEMS:-0}; PROMPTS=${PROMPTS:-4}
fi

# method name -> trainer flags (Appendix G: Dr. GRPO without std-norm, RLRT/RLSD with it, lambda 0.5)
method_args() {
  case "$1" in
    grpo) echo "--advantage-estimator grpo" ;;
    rlrt_eps1) echo "--advantage-estimator rlrt --rlrt-lambda 0.5 --rlrt-clip-eps 1.0" ;;
    rlrt_eps02) echo "--advantage-estimator rlrt --rlrt-lambda 0.5 --rlrt-clip-eps 0.2" ;;
    rlrt_all) echo "--advantage-estimator rlrt_all --rlrt-lambda 0.5 --rlrt-clip-eps 1.0" ;;
    rlsd) echo "--advantage-estimator rlsd --rlrt-lambda 0.5 --rlrt-clip-eps 0.2 --rlrt-lambda-decay-steps $STEPS" ;;
    grpo_eb) echo "--advantage-estimator grpo_eb" ;;
    *) echo "error: unknown method $1 (grpo rlrt_eps1 rlrt_eps02 rlrt_all rlsd grpo_eb)" >&2; return 2 ;;
  esac
}
for m in $METHODS; do method_args "$m" >/dev/null; done

export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONHASHSEED=0 HF_HUB_DISABLE_PROGRESS_BARS=1
mkdir -p "$OUT/logs" "$OUT/setup"
export MEGATRON_RLRT_NOISE_LOG=${MEGATRON_RLRT_NOISE_LOG:-$OUT/logs/warnings.log}
log() { echo "[study $(date -u +%H:%M:%S)] $*"; }
start=$(date +%s)
SETUP=$OUT/setup

[ -d "$SETUP/tiny-qwen3" ] || { log "tiny Qwen3 -> $SETUP/tiny-qwen3"
  $PY tools/make_tiny_qwen3.py --output-dir "$SETUP/tiny-qwen3" --hidden-size 128 --intermediate-size 512 \
    --num-hidden-layers 4 --num-attention-heads 4 --num-key-value-heads 2 --head-dim 32; }
if [ ! -f "$SETUP/data/eval.jsonl" ]; then
  log "three-term additions -> $SETUP/data"
  TASK=$($PY -c 'import json; from megatron_rlrt.data.strategy_task import TASK_CONFIG; print(json.dumps(TASK_CONFIG))')
  $PY tools/make_dataset.py reasoning-gym --task basic_arithmetic --size 300 --seed 1 --config "$TASK" \
    --instruction "Answer with <answer>N</answer>." --out "$SETUP/data/train.jsonl" \
    --eval-size 100 --eval-out "$SETUP/data/eval.jsonl"
fi
[ -d "$SETUP/tiny-qwen3-warm" ] || { log "warm-up SFT ($SFT_STEPS steps, student + teacher views) -> $SETUP/tiny-qwen3-warm"
  $PY tools/warmup_sft.py --task strategies --hf-dir "$SETUP/tiny-qwen3" --data "$SETUP/data/train.jsonl" \
    --output-dir "$SETUP/tiny-qwen3-warm" --steps "$SFT_STEPS" --batch-size 24 --sampled-softmax 2048 --no-progress; }
[ -f "$OUT/teacher_view_check.json" ] || { log "step-0 teacher check -> $OUT/teacher_view_check.json"
  $PY tools/teacher_view_check.py --hf-dir "$SETUP/tiny-qwen3-warm" --data "$SETUP/data/eval.jsonl" \
    --max-problems $(( EVAL_PROBLEMS > 0 && EVAL_PROBLEMS < 40 ? EVAL_PROBLEMS : 40 )) --n-samples 8 --max-new-tokens 64 --output "$OUT/teacher_view_check.json" \
    | tee "$OUT/logs/teacher_view_check.md"; }

evaluate() {  # evaluate LABEL CHECKPOINT DIR: pass@k of one checkpoint on the held-out problems (resumable)
  $PY tools/evaluate.py --checkpoint "$1=$2" --data "heldout=$SETUP/data/eval.jsonl" --n-samples "$EVAL_N" \
    --max-new-tokens 64 --reward auto --max-problems "$EVAL_PROBLEMS" --no-progress --output-dir "$3" \
    > "$3.log" 2>&1 || { echo "evaluation failed, see $3.log" >&2; return 1; }
}
mkdir -p "$OUT/step0"
[ -f "$OUT/step0/eval/summary.json" ] || { log "held-out evaluation of the warm-up model"; evaluate step0 "$SETUP/tiny-qwen3-warm" "$OUT/step0/eval"; }

for seed in $SEEDS; do
  for m in $METHODS; do
    run=$OUT/runs/$m-s$seed
    if grep -qx "iter_$(printf %07d "$STEPS")" "$run/checkpoints/latest" 2>/dev/null; then
      log "$m seed $seed: finished, skipped"
    else
      log "$m seed $seed: $STEPS RL steps, TP=2 on 2 processes -> $run"
      mkdir -p "$run"
      port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
      # shellcheck disable=SC2046
      MASTER_PORT=$port NPROC_PER_NODE=2 bash examples/train_rlrt_qwen3.sh \
        --hf-checkpoint "$SETUP/tiny-qwen3-warm" --prompt-data "$SETUP/data/train.jsonl" --no-enable-thinking \
        --tensor-model-parallel-size 2 $(method_args "$m") --seed "$seed" \
        --rollout-batch-size "$PROMPTS" --n-samples-per-prompt 8 --rollout-max-response-len 64 \
        --use-dynamic-batch-size --max-tokens-per-gpu 2048 \
        --train-iters "$STEPS" --lr 2e-4 --lr-warmup-iters 2 --save "$run" --save-interval "$STEPS" \
        > "$run/train.log" 2>&1 || { echo "error: $m seed $seed failed, see $run/train.log" >&2; exit 1; }
    fi
    [ -f "$run/eval/summary.json" ] || { log "$m seed $seed: held-out evaluation"; evaluate "$m-s$seed" "$run" "$run/eval"; }
  done
done

log "comparison -> $OUT/report"
mkdir -p "$OUT/report"
$PY tools/compare_runs.py "$OUT"/runs/* --baseline-eval "$OUT/step0/eval" --output-dir "$OUT/report" | tee "$OUT/logs/compare_runs.md"
log "study finished in $(( $(date +%s) - start )) s"
