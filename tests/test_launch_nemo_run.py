"""examples/nemo_run/launch_rlrt.py: the NeMo-Run launcher.

NeMo-Run lives in its own venv (.venv-launch, made by scripts/setup_launch_env.sh; $MEGATRON_RLRT_LAUNCH_VENV
overrides), like on a login node: the launcher never imports torch, the job runs the trainer's
environment. The local executor runs for real (torchrun, 2 CPU ranks, TP=2, one RL step); Slurm and
Docker are checked through ``--dryrun``: the sbatch script / container spec NeMo-Run would submit.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "examples", "nemo_run", "launch_rlrt.py")
RECIPE = "examples/recipes/qwen3_8b_base.yaml"


@pytest.fixture(scope="module")
def launch_python() -> str:
    venv = os.environ.get("MEGATRON_RLRT_LAUNCH_VENV", os.path.join(REPO, ".venv-launch"))
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        pytest.skip(f"{venv} missing: scripts/setup_launch_env.sh installs NeMo-Run there")
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(bool(u.find_spec('nemo_run')))"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        pytest.skip(f"nemo_run is not installed in {venv} (scripts/setup_launch_env.sh installs it)")
    return python


def _launch(python, args, tmp_path, timeout=120, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGATRON_RLRT_IMAGE"))}
    full_env.update(NEMORUN_HOME=str(tmp_path / "nemo_run"), OMP_NUM_THREADS="1", COLUMNS="200", **env)
    return subprocess.run([python, LAUNCHER, *args], env=full_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout)


def _section(stdout: str, executor: str) -> str:
    marker = f"### {executor} job train\n"
    assert marker in stdout, stdout[-3000:]
    return stdout.split(marker, 1)[1]


def test_help_and_usage_errors_without_nemo_run(tmp_path):
    """--help and argument errors need no NeMo-Run (the trainer's interpreter has none)."""
    out = _launch(sys.executable, ["--help"], tmp_path)
    assert out.returncode == 0 and "--executor" in out.stdout and "--container-mounts" in out.stdout
    bad = _launch(sys.executable, ["--executor", "docker", "--recipe", RECIPE], tmp_path)
    assert bad.returncode == 2 and "--container-image" in bad.stderr
    bad = _launch(sys.executable, ["--executor", "local", "--nodes", "2"], tmp_path)
    assert bad.returncode == 2 and "one node" in bad.stderr


@pytest.mark.parametrize("packager", ["git", "none"])
def test_slurm_dryrun_4_nodes_x_8_gpus(launch_python, tmp_path, packager):
    image = "registry.example.com/megatron-rlrt:0.1.0"
    mounts = ["/lustre/models:/models", "/lustre/data:/data", "/lustre/runs:/runs"]
    overrides = ["--hf-checkpoint", "/models/Qwen3-8B-Base", "--prompt-data", "/data/dapo-math-17k.parquet",
                 "--save", "/runs/rlrt-qwen3-8b", "--rollout-max-response-len", "20480", "--sequence-parallel"]
    args = ["--executor", "slurm", "--nodes", "4", "--gpus-per-node", "8", "--account", "acct", "--partition", "batch",
            "--time", "08:00:00", "--container-image", image, "--packager", packager, "--job-dir", str(tmp_path / "jobs"),
            "--recipe", RECIPE, "--dryrun"]
    for m in mounts:
        args += ["--container-mounts", m]
    out = _launch(launch_python, args + overrides, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    script = _section(out.stdout, "slurm")
    assert script.startswith("# submit: sbatch")

    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, flags=re.M))
    assert sbatch["nodes"] == "4" and sbatch["gpus-per-node"] == "8"
    assert sbatch["ntasks-per-node"] == "1"  # one torchrun per node, 8 ranks each
    assert sbatch["account"] == "acct" and sbatch["partition"] == "batch" and sbatch["time"] == "08:00:00"
    assert sbatch["job-name"] == "megatron-rlrt.train"
    assert "export TOKENIZERS_PARALLELISM=false" in script

    (srun_line,) = [line for line in script.splitlines() if line.startswith("srun ") and "torchrun" in line]
    srun = shlex.split(srun_line)
    opt = {srun[i]: srun[i + 1] for i in range(len(srun) - 1) if srun[i].startswith("--container")}
    assert opt["--container-image"] == image
    job_mount = opt["--container-mounts"].split(",")
    assert job_mount[:3] == mounts and job_mount[3].endswith(":/nemo_run")  # + NeMo-Run's job directory
    assert opt["--container-workdir"] == "/nemo_run/code"
    assert "--kill-on-bad-exit=1" in srun

    torchrun = srun[srun.index("torchrun"):]
    flags = {torchrun[i]: torchrun[i + 1] for i in range(1, torchrun.index("-m"), 2)}
    assert flags["--nnodes"] == "4" and flags["--nproc-per-node"] == "8"
    assert flags["--node-rank"] == "$SLURM_NODEID"  # shlex keeps the variable for the node's shell
    assert flags["--rdzv-backend"] == "c10d" and flags["--rdzv-endpoint"] == "$head_node_ip:29500"
    assert "head_node_ip=$(srun --nodes=1 --ntasks=1" in script  # the first node's address, resolved in the job

    trainer = torchrun[torchrun.index("-m"):]
    recipe = RECIPE if packager == "git" else f"/opt/megatron-rlrt/{RECIPE}"
    assert trainer == ["-m", "megatron_rlrt.trainer.cli", "--config", recipe, *overrides]
    if packager == "none":  # the image's copy of the repository is importable from NeMo-Run's code dir
        assert "export PYTHONPATH=/opt/megatron-rlrt" in script


def test_docker_dryrun(launch_python, tmp_path):
    out = _launch(launch_python, ["--executor", "docker", "--container-image", "megatron-rlrt:latest",
                                  "--container-mounts", "/data:/data", "--nproc-per-node", "8", "--packager", "none",
                                  "--recipe", RECIPE, "--save", "/data/runs/x", "--dryrun"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    spec = _section(out.stdout, "docker")
    assert "image megatron-rlrt:latest, gpus -1, runtime nvidia, ipc host" in spec
    assert re.search(r"# volumes: /data:/data \S+:/nemo_run", spec)
    command = shlex.split(spec.strip().splitlines()[3])
    assert command[0] == "torchrun" and command[command.index("--nproc-per-node") + 1] == "8"
    assert command[command.index("-m"):] == ["-m", "megatron_rlrt.trainer.cli", "--config",
                                              f"/opt/megatron-rlrt/{RECIPE}", "--save", "/data/runs/x"]


def test_local_executor_trains_two_ranks(launch_python, tiny_model, tmp_path):
    """NeMo-Run LocalExecutor(ntasks_per_node=2, launcher="torchrun") runs the trainer for real: recipe +
    overrides (the command line wins: --train-iters 1 over the recipe's 3), TP=2 on 2 CPU ranks."""
    from megatron_rlrt.data.generators import reasoning_gym_rows, write_jsonl

    data = tmp_path / "train.jsonl"
    write_jsonl(list(reasoning_gym_rows("chain_sum", size=4, seed=3, config={
        "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})), str(data))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"hf-checkpoint: {tiny_model}\nprompt-data: {data}\nreward: reasoning_gym\n"
                      "tensor-model-parallel-size: 2\nrollout-batch-size: 2\nn-samples-per-prompt: 2\n"
                      "rollout-max-response-len: 4\ntrain-iters: 3\nprogress: false\ntensorboard: false\n")
    run_dir = tmp_path / "run"
    out = _launch(launch_python, ["--executor", "local", "--nproc-per-node", "2", "--python", sys.executable,
                                  "--env", "MEGATRON_RLRT_OPS_BACKEND=torch",  # launching is under test
                                  "--recipe", str(recipe), "--train-iters", "1", "--save", str(run_dir)],
                  tmp_path, timeout=300, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "--nproc-per-node 2" in log or "local_ranks=[0, 1]" in log
    steps = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [s["step"] for s in steps] == [1]
    assert (run_dir / "checkpoints" / "latest").exists()
