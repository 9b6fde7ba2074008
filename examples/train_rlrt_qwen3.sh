#!/usr/bin/env bash
# Launch megatron-rlrt training with torchrun on one or many nodes.
#
#   examples/train_rlrt_qwen3.sh --config examples/recipes/qwen3_8b_thinking.yaml \
#       --hf-checkpoint /models/Qwen3-8B --prompt-data /data/dapo-math-17k.parquet --save runs/rlrt
#
# Every argument goes to the trainer (python -m megatron_rlrt.trainer.cli --help lists them).
# Environment:
#   NPROC_PER_NODE  ranks per node (default: GPUs on this node, else 2 on a CPU)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (Slurm's SLURM_NNODES,
#                   SLURM_NODEID and the first host of SLURM_JOB_NODELIST are used when set)
#   PYTHON          interpreter (default: .venv/bin/python if present, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [ -z "${MASTER_ADDR:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  else
    MASTER_ADDR=127.0.0.1
  fi
fi
MASTER_PORT=${MASTER_PORT:-29500}

if ! "$PYTHON" -c 'import torch; exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per rank: ranks share the cores
fi
export TOKENIZERS_PARALLELISM=false

exec "$PYTHON" -m torch.distributed.run \
  --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_rlrt.trainer.cli "$@"
