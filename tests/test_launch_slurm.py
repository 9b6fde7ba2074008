"""Multi-node launching without NeMo-Run: examples/slurm/train_rlrt_qwen3.sbatch running
examples/train_rlrt_qwen3.sh once per node, on this machine.

A stand-in ``srun`` (one process per "node", SLURM_NODEID=0..N-1, like ``srun --ntasks-per-node 1``)
and ``scontrol show hostnames`` put a 2-node job on loopback: two torchrun invocations with
--nnodes 2 and node ranks 0 and 1 that meet at 127.0.0.1 and train one real RL step (DP=2).
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(REPO, "examples", "slurm", "train_rlrt_qwen3.sbatch")
TRAIN_SH = os.path.join(REPO, "examples", "train_rlrt_qwen3.sh")

FAKE_SRUN = r'''#!PYTHON
"""srun stand-in: records its arguments, then runs the command once per node of the job on this
machine (SLURM_NODEID/SLURM_PROCID = 0..N-1), waits for all, and exits like srun."""
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
takes_value = {"--nodes", "-N", "--ntasks-per-node", "--container-image", "--container-workdir",
               "--container-mounts", "--output", "--error"}
nodes = int(os.environ.get("SLURM_NNODES", "1"))
while args and args[0].startswith("-"):
    opt = args.pop(0)
    if opt in ("--nodes", "-N"):
        nodes = int(args[0])
    if opt in takes_value:
        args.pop(0)
if "--container-image" in sys.argv or os.environ.get("FAKE_SRUN_DRY"):
    sys.exit(0)  # a container cannot run here: only the arguments are checked
procs = [subprocess.Popen(args, env={**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i),
                                      "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": str(nodes)})
         for i in range(nodes)]
codes = [p.wait() for p in procs]
sys.exit(max(codes, key=abs))
'''

FAKE_SCONTROL = r'''#!/bin/bash
# scontrol stand-in: only "scontrol show hostnames LIST" (a comma-separated list, no ranges)
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: unsupported: $*" >&2; exit 1; }
tr ',' '\n' <<< "$3"
'''

# python stand-in for the wiring test: records the torchrun command line each node would run
FAKE_PYTHON = r'''#!/bin/bash
[ "$1" = "-c" ] && exit 1   # "is CUDA available?" -> no
echo "node ${SLURM_NODEID:-?} $*" >> "$FAKE_PYTHON_LOG"
'''


def _write_exe(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text.replace("#!PYTHON", "#!" + sys.executable))
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def fake_slurm(tmp_path):
    """PATH with srun/scontrol stand-ins and the environment of a 2-node batch job."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write_exe(bindir / "srun", FAKE_SRUN)
    _write_exe(bindir / "scontrol", FAKE_SCONTROL)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "NNODES", "CONTAINER_", "MEGATRON_RLRT_DIR"))}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", FAKE_SRUN_LOG=str(tmp_path / "srun.log"),
               SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1",
               SLURM_SUBMIT_DIR=REPO, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _srun_calls(env) -> list[list[str]]:
    with open(env["FAKE_SRUN_LOG"]) as f:
        return [json.loads(line) for line in f]


def test_sbatch_header_requests_one_task_per_node():
    text = open(SBATCH).read()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
    assert flags["ntasks-per-node"] == "1" and flags["gpus-per-node"] == "8" and flags["nodes"] == "4"
    assert "exclusive" in flags and "time" in flags
    # the default layout: examples/train_rlrt_qwen3.sh under srun, one torchrun per node
    assert re.search(r'^srun .*bash "\$REPO/examples/train_rlrt_qwen3.sh" "\$@"$', text, flags=re.M)


def test_sbatch_wiring_per_node_torchrun_args(fake_slurm, tmp_path):
    """Real sbatch script + real train_rlrt_qwen3.sh; srun, scontrol and python are stand-ins that record
    what each node would run (milliseconds)."""
    env = dict(fake_slurm, PYTHON=_write_exe(tmp_path / "python", FAKE_PYTHON),
               FAKE_PYTHON_LOG=str(tmp_path / "python.log"), NPROC_PER_NODE="8", NODE_RANK="7")
    proc = subprocess.run(["bash", SBATCH, "--config", "examples/recipes/qwen3_8b_base.yaml", "--lr", "2e-6"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (srun,) = _srun_calls(env)
    assert srun[:6] == ["--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "--cpu-bind=none"]
    assert srun[6:] == ["bash", TRAIN_SH, "--config", "examples/recipes/qwen3_8b_base.yaml", "--lr", "2e-6"]
    lines = sorted(open(env["FAKE_PYTHON_LOG"]).read().splitlines())
    assert len(lines) == 2, lines
    for node, line in enumerate(lines):
        # the stale NODE_RANK=7 of the submitting shell is ignored: each node's rank is its SLURM_NODEID
        assert line == (f"node {node} -m torch.distributed.run --nproc-per-node 8 --nnodes 2 --node-rank {node} "
                        "--master-addr 127.0.0.1 --master-port 29500 -m megatron_rlrt.trainer.cli "
                        "--config examples/recipes/qwen3_8b_base.yaml --lr 2e-6"), line


def test_sbatch_container_args(fake_slurm, tmp_path):
    env = dict(fake_slurm, CONTAINER_IMAGE="registry.example.com/megatron-rlrt:latest",
               CONTAINER_MOUNTS="/lustre/models:/models,/lustre/runs:/runs")
    proc = subprocess.run(["bash", SBATCH, "--save", "/runs/x"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (srun,) = _srun_calls(env)
    joined = " ".join(srun)
    assert "--container-image registry.example.com/megatron-rlrt:latest" in joined
    assert "--container-workdir /opt/megatron-rlrt" in joined
    assert "--container-mounts /lustre/models:/models,/lustre/runs:/runs" in joined
    assert srun[-4:] == ["bash", "/opt/megatron-rlrt/examples/train_rlrt_qwen3.sh", "--save", "/runs/x"]


def test_four_node_recipe_differs_from_the_paper_recipe_only_in_layout():
    """examples/slurm/qwen3_8b_base_4nodes.yaml (docs/cluster.md) = examples/recipes/qwen3_8b_base.yaml
    with the 4-node layout: the algorithm settings must not drift apart."""
    from megatron_rlrt.config import load_recipe

    base = load_recipe(os.path.join(REPO, "examples", "recipes", "qwen3_8b_base.yaml"))
    four = load_recipe(os.path.join(REPO, "examples", "slurm", "qwen3_8b_base_4nodes.yaml"))
    differ = {k for k in set(base) | set(four) if base.get(k) != four.get(k)}
    assert differ == {"sequence_parallel", "colocate", "save"}, differ
    assert four["colocate"] is False and four["sequence_parallel"] is True
    assert four["tensor_model_parallel_size"] == 2 and four["max_tokens_per_gpu"] >= 22528 + 20480


def test_two_node_job_on_loopback_trains(fake_slurm, tiny_model, tmp_path):
    """sbatch -> srun (2 'nodes') -> examples/train_rlrt_qwen3.sh x2 -> torchrun --nnodes 2 --node-rank 0/1
    at 127.0.0.1 -> one RL step with DP=2 on the trainer; checkpoint and metrics are written."""
    from megatron_rlrt.data.generators import reasoning_gym_rows, write_jsonl

    data = tmp_path / "train.jsonl"
    write_jsonl(list(reasoning_gym_rows("chain_sum", size=4, seed=3, config={
        "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})), str(data))
    run_dir = tmp_path / "run"
    env = dict(fake_slurm, NPROC_PER_NODE="1", MASTER_PORT=str(_free_port()), PYTHON=sys.executable,
               LOGLEVEL="INFO", MEGATRON_RLRT_OPS_BACKEND="torch")  # launching is under test, not the C++ kernels
    proc = subprocess.run(
        ["bash", SBATCH, "--hf-checkpoint", tiny_model, "--prompt-data", str(data), "--reward", "reasoning_gym",
         "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "4",
         "--train-iters", "1", "--no-progress", "--no-tensorboard", "--save", str(run_dir)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "2 node(s), rendezvous 127.0.0.1" in out
    # two torchrun agents (LOGLEVEL=INFO makes them report their rendezvous): nodes 0 and 1 of 2
    assert sorted(re.findall(r"group_rank=(\d+)", out)) == ["0", "1"], out[-4000:]
    assert out.count("group_world_size=2") == 2
    steps = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [s["step"] for s in steps] == [1]
    assert (run_dir / "checkpoints" / "latest").exists()
