#!/usr/bin/env python3
"""Launch megatron-rlrt training with NeMo-Run: on this machine, on a Slurm cluster, or in Docker.

    # this machine (GPUs, or 2 CPU ranks): the same job as examples/train_rlrt_qwen3.sh
    python examples/nemo_run/launch_rlrt.py --executor local --recipe examples/recipes/qwen3_4b_base.yaml \\
        --hf-checkpoint /models/Qwen3-4B-Base --prompt-data /data/dapo-math-17k.parquet --save runs/rlrt-4b

    # Slurm + pyxis/enroot: 4 nodes x 8 GPUs in the project's container (see docs/cluster.md)
    python examples/nemo_run/launch_rlrt.py --executor slurm --nodes 4 --gpus-per-node 8 \\
        --account ACCT --partition batch --time 04:00:00 --container-image registry/megatron-rlrt:latest \\
        --container-mounts /lustre/models:/models --container-mounts /lustre/data:/data \\
        --recipe examples/recipes/qwen3_8b_base.yaml --hf-checkpoint /models/Qwen3-8B-Base \\
        --save /lustre/runs/rlrt-8b --dryrun

Launcher options are listed by --help; every other argument goes to the trainer unchanged, exactly
as examples/train_rlrt_qwen3.sh passes them (``--`` ends the launcher's options explicitly).
``--recipe FILE`` becomes the trainer's ``--config FILE``; overrides after it win over the recipe.
Every executor runs one task: ``torchrun --nnodes N --nproc-per-node P ... -m
megatron_rlrt.trainer.cli --config RECIPE OVERRIDES`` (NeMo-Run's torchrun launcher: one torchrun
per node, rendezvous on the first node). ``--dryrun`` prints what would be submitted (the torchrun
command, the sbatch script, or the container spec) and submits nothing.

Paths: like examples/train_rlrt_qwen3.sh, the job runs from the repository root, so relative
paths (recipe, --save, data) are relative to it. On Slurm/Docker the job runs in NeMo-Run's
code directory: with ``--packager git`` (default) that is this repository's committed HEAD, so
repository-relative paths work there too; with ``--packager none`` the image's copy at
``--code-dir`` is used and the recipe path is translated to it. Data, models and --save should be
absolute paths on mounted shared storage.

NeMo-Run is a launcher dependency (``pip install -e ".[launch]"`` or scripts/setup_launch_env.sh, which
puts it in .venv-launch); the trainer itself never imports it. The ``if __name__ == "__main__"``
guard matters: NeMo-Run's torchrun workers must not re-run this file.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINER_MODULE = "megatron_rlrt.trainer.cli"
DEFAULT_CODE_DIR = "/opt/megatron-rlrt"  # where the Dockerfile puts this repository
EXECUTORS = ("local", "slurm", "docker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch_rlrt.py",
        description="Launch megatron-rlrt training through NeMo-Run (local, Slurm or Docker). "
        "Unknown arguments are trainer flags (python -m megatron_rlrt.trainer.cli --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a trainer flag must never be taken for an abbreviated launcher option
    )
    g = p.add_argument_group("job")
    g.add_argument("--executor", choices=EXECUTORS, required=True,
                   help="where to run: this machine (local), a Slurm cluster (slurm) or one Docker container (docker)")
    g.add_argument("--recipe", default=None,
                   help="trainer recipe YAML (examples/recipes/*.yaml), passed as --config; a relative path is "
                   "looked up in the repository first, then in the current directory")
    g.add_argument("--name", default="megatron-rlrt", help="experiment title (NeMo-Run) and Slurm job name suffix")
    g.add_argument("--nodes", type=int, default=1, help="number of nodes (slurm; local and docker run on one node)")
    g.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks per node (default: --gpus-per-node on slurm, all GPUs for local/docker, 2 on a CPU)")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for every rank (repeatable)")
    g.add_argument("--dryrun", action="store_true",
                   help="print what would be launched (torchrun command / sbatch script / container) and exit")
    g.add_argument("--detach", action="store_true",
                   help="return after submitting (slurm/docker) instead of following the job to its end")
    g.add_argument("--nemo-run-home", default=None,
                   help="NeMo-Run's experiment directory (default: $NEMORUN_HOME or ~/.nemo_run)")

    g = p.add_argument_group("local executor")
    g.add_argument("--python", default=None,
                   help="interpreter of the training environment whose torchrun runs the job "
                   "(default: $PYTHON, else the repository's .venv/bin/python, else this interpreter)")

    g = p.add_argument_group("slurm executor")
    g.add_argument("--account", default=os.environ.get("SLURM_ACCOUNT"), help="Slurm account (sbatch --account)")
    g.add_argument("--partition", default=os.environ.get("SLURM_PARTITION"), help="Slurm partition")
    g.add_argument("--time", default="04:00:00", help="wall-clock limit (sbatch --time)")
    g.add_argument("--qos", default=None, help="Slurm QOS")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (sbatch --gpus-per-node)")
    g.add_argument("--exclusive", action="store_true", help="request whole nodes (sbatch --exclusive)")
    g.add_argument("--job-dir", default=None,
                   help="shared directory for NeMo-Run's job files and logs on the cluster "
                   "(default: $NEMORUN_HOME/experiments; must be visible from the compute nodes)")
    g.add_argument("--ssh-host", default=None,
                   help="submit from this machine over SSH to this login node (default: sbatch runs here)")
    g.add_argument("--ssh-user", default=os.environ.get("USER"), help="user for --ssh-host")
    g.add_argument("--ssh-identity", default=None, help="SSH private key for --ssh-host")

    g = p.add_argument_group("container (slurm via pyxis/enroot, docker)")
    g.add_argument("--container-image", default=os.environ.get("MEGATRON_RLRT_IMAGE"),
                   help="image built from the repository's Dockerfile (default: $MEGATRON_RLRT_IMAGE); "
                   "required for docker, optional for slurm (without it the job uses the nodes' environment)")
    g.add_argument("--container-mounts", action="append", default=[], metavar="SRC:DST",
                   help="bind mount for models, data and run directories (repeatable)")
    g.add_argument("--packager", choices=("git", "none"), default="git",
                   help="code the job runs: git = this repository's committed HEAD (NeMo-Run's GitArchivePackager), "
                   "none = the copy inside the image at --code-dir")
    g.add_argument("--code-dir", default=DEFAULT_CODE_DIR,
                   help="repository location inside the image (used with --packager none)")
    g.add_argument("--shm-size", default="64g", help="docker: /dev/shm size")
    return p


def split_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launcher options and the trainer's arguments (everything else, in order)."""
    argv = list(argv)
    explicit: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, explicit = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    if ns.executor != "slurm" and ns.nodes != 1:
        parser.error(f"--nodes {ns.nodes}: the {ns.executor} executor runs on one node (use --executor slurm)")
    if ns.executor == "docker" and not ns.container_image:
        parser.error("--executor docker needs --container-image (or $MEGATRON_RLRT_IMAGE)")
    if ns.executor == "slurm" and not ns.account:
        parser.error("--executor slurm needs --account (or $SLURM_ACCOUNT)")
    if ns.ssh_host and not ns.job_dir:
        parser.error("--ssh-host needs --job-dir: the job directory on the cluster's shared storage")
    for kv in ns.env:
        if "=" not in kv:
            parser.error(f"--env {kv!r}: expected KEY=VALUE")
    if ns.python:
        ns.python = os.path.abspath(ns.python)  # before the launcher changes to the repository
    return ns, rest + explicit


def trainer_python(ns: argparse.Namespace) -> str:
    if ns.python:
        return ns.python
    if os.environ.get("PYTHON"):
        return os.environ["PYTHON"]
    venv = os.path.join(REPO, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def local_gpu_count(python: str) -> int:
    """GPUs visible to the training interpreter (0 without CUDA), asked the way train_rlrt_qwen3.sh does."""
    try:
        out = subprocess.run([python, "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        return int(out.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001 - no torch / no CUDA: a CPU run
        return 0


def recipe_arg(ns: argparse.Namespace) -> list[str]:
    """``--config PATH`` as the job will see it (or nothing without --recipe)."""
    if not ns.recipe:
        return []
    path = ns.recipe if os.path.isabs(ns.recipe) else os.path.join(REPO, ns.recipe)
    if not os.path.exists(path) and os.path.exists(ns.recipe):  # relative to where the launcher runs
        path = os.path.abspath(ns.recipe)
    path = os.path.normpath(path)
    inside = os.path.commonpath([path, REPO]) == REPO
    if ns.executor == "local":
        if not os.path.isfile(path):
            raise SystemExit(f"error: --recipe {ns.recipe}: no such file")
        return ["--config", path]
    if not inside:
        return ["--config", ns.recipe]  # a path on the cluster / in a mount: passed as given
    rel = os.path.relpath(path, REPO)
    if ns.packager == "git":
        return ["--config", rel]  # the job's working directory is the packaged repository
    return ["--config", os.path.join(ns.code_dir, rel)]


def job_env(ns: argparse.Namespace) -> dict[str, str]:
    # (torchrun itself sets OMP_NUM_THREADS=1 per rank when it starts several and none is set)
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if ns.executor != "local" and ns.packager == "none":
        env["PYTHONPATH"] = ns.code_dir
    for kv in ns.env:
        key, value = kv.split("=", 1)
        env[key] = value
    return env


def make_executor(ns: argparse.Namespace):
    import nemo_run as run

    if ns.executor == "local":
        python = trainer_python(ns)
        nproc = ns.nproc_per_node or local_gpu_count(python) or 2
        env = job_env(ns)
        # NeMo-Run's torchrun component runs `torchrun` from PATH: the training environment's one
        env["PATH"] = os.path.dirname(os.path.abspath(python))
        return run.LocalExecutor(ntasks_per_node=nproc, launcher="torchrun", env_vars=env)

    packager = run.GitArchivePackager() if ns.packager == "git" else run.Packager()
    if ns.executor == "slurm":
        job_dir = ns.job_dir or ""
        if ns.ssh_host:
            tunnel = run.SSHTunnel(host=ns.ssh_host, user=ns.ssh_user, job_dir=job_dir, identity=ns.ssh_identity)
        else:
            tunnel = run.LocalTunnel(job_dir=job_dir)
        nproc = ns.nproc_per_node or ns.gpus_per_node
        return run.SlurmExecutor(
            account=ns.account, partition=ns.partition, time=ns.time, qos=ns.qos, job_name_prefix=f"{ns.name}.",
            nodes=ns.nodes, ntasks_per_node=nproc, gpus_per_node=ns.gpus_per_node,
            exclusive=True if ns.exclusive else None,
            container_image=ns.container_image, container_mounts=list(ns.container_mounts),
            tunnel=tunnel, packager=packager, launcher="torchrun",
            env_vars=job_env(ns),
        )
    return run.DockerExecutor(
        container_image=ns.container_image, num_gpus=-1, runtime="nvidia", ipc_mode="host",
        shm_size=ns.shm_size, ulimits=["memlock:-1", "stack:67108864"],
        ntasks_per_node=ns.nproc_per_node or 8, volumes=list(ns.container_mounts),
        packager=packager, launcher="torchrun", env_vars=job_env(ns),
    )


def make_task(trainer_args: list[str]):
    import nemo_run as run

    # `python -m megatron_rlrt.trainer.cli ARGS`, wrapped by the executor's torchrun launcher
    return run.Script(path=TRAINER_MODULE, m=True, entrypoint="python", args=list(trainer_args))


def describe_dryrun(job) -> str:
    """Plain text of what one job would submit: the sbatch script, container spec or command."""
    info = getattr(job, "_dryrun_info", None)
    request = getattr(info, "request", None)
    if request is None:
        return str(info)
    if hasattr(request, "materialize"):  # Slurm: the sbatch command and the full script
        cmd = " ".join(shlex.quote(a) for a in request.launch_cmd)
        return f"# submit: {cmd} SBATCH_SCRIPT\n{request.materialize()}"
    if hasattr(request, "role_params"):  # local: one process per replica (torchrun)
        lines = []
        for role, replicas in request.role_params.items():
            for rep in replicas:
                env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(rep.env.items()))
                lines.append(f"# role {role}: cd {shlex.quote(rep.cwd or os.getcwd())}\n"
                             f"env {env} {' '.join(shlex.quote(a) for a in rep.args)}")
        return "\n".join(lines)
    if hasattr(request, "containers"):  # Docker: one container per task
        lines = []
        for c in request.containers:
            ex = c.executor
            lines.append(f"# container {c.name}: image {ex.container_image}, gpus {ex.num_gpus}, "
                         f"runtime {ex.runtime}, ipc {ex.ipc_mode}, shm {ex.shm_size}")
            lines.append("# volumes: " + " ".join(ex.volumes + [f"{ex.job_dir}:/nemo_run"]))
            lines.append("# env: " + " ".join(f"{k}={v}" for k, v in sorted((ex.env_vars | c.extra_env).items())))
            lines.append(" ".join(shlex.quote(a) for a in c.command))
        return "\n".join(lines)
    return str(request)


def main(argv: Sequence[str] | None = None) -> int:
    ns, trainer_args = split_argv(sys.argv[1:] if argv is None else argv)
    if ns.nemo_run_home:
        os.environ["NEMORUN_HOME"] = os.path.abspath(ns.nemo_run_home)
    try:
        import nemo_run as run
        from torchx.specs import AppState
    except ImportError:
        print("error: nemo_run is not installed here; `pip install -e \".[launch]\"` (nemo-run==0.11.1 with "
              "leptonai==0.27.3) or run scripts/setup_launch_env.sh and use .venv-launch/bin/python", file=sys.stderr)
        return 2
    if ns.nemo_run_home:
        run.config.set_nemorun_home(os.environ["NEMORUN_HOME"])

    args = recipe_arg(ns) + trainer_args
    # like examples/train_rlrt_qwen3.sh, run from the repository: relative paths are relative to it, and
    # NeMo-Run's GitArchivePackager packages the git repository of the working directory
    os.chdir(REPO)
    executor = make_executor(ns)
    with run.Experiment(ns.name, executor=executor, log_level="WARN" if ns.dryrun else "INFO",
                        enable_goodbye_message=False) as exp:
        exp.add(make_task(args), name="train")
        if ns.dryrun:
            exp.dryrun(log=False)
            for job in exp.jobs:
                print(f"### {ns.executor} job {job.id}")
                print(describe_dryrun(job))
            return 0
        exp.run(detach=ns.detach and ns.executor != "local", tail_logs=ns.executor == "local")
    # leaving the `with` block waits for the jobs (unless detached); then their states are final
    ok = {AppState.SUCCEEDED} | ({AppState.SUBMITTED, AppState.PENDING, AppState.RUNNING} if ns.detach else set())
    failed = {job.id: job.state.name for job in exp.jobs if job.state not in ok}
    if failed:
        print(f"error: job(s) did not succeed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # required: NeMo-Run / torchrun workers must not re-run the launcher
    sys.exit(main())
