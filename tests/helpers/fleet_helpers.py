"""Whole-step runs of the trainer against fake SGLang servers (tests/helpers/fake_sglang_server.py), per rank.

``fleet_rank`` is what every rank runs (through ``parallel.spawn``, or as ``python -m
tests.helpers.fleet_helpers SPEC.json`` under torchrun for the 2-"node" test): register an ``sglang``
engine that is the real ``SGLangEngine`` except that the server it launches is the enforcing
fake, train, and record what the servers saw while the trainer was training, then the
trainer's final weights as HF tensors (rank 0) for the test to compare with what each server
rebuilt from the updates.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "fake_sglang_server.py")


def fake_state(url: str) -> dict:
    with urllib.request.urlopen(url + "/_fake/state", timeout=30) as r:
        return json.load(r)


def device_pid_dir(root: str) -> str:
    """Where this node's training processes note which 'GPU' (local rank) each one stands for."""
    return os.path.join(root, f"devices_node{os.environ.get('GROUP_RANK', '0')}")


def note_device_pid(root: str) -> None:
    """CPU stand-in for 'this process trains on GPU LOCAL_RANK' (read by the fake servers)."""
    os.makedirs(device_pid_dir(root), exist_ok=True)
    with open(os.path.join(device_pid_dir(root), f"device{os.environ.get('LOCAL_RANK', '0')}.pid"), "w") as f:
        f.write(str(os.getpid()))


def register_fake_sglang(expect_device: str = "cpu", pid_root: str | None = None) -> None:
    """``--rollout-engine sglang`` launches fake servers (one per GPU group of each node) instead of
    SGLang; with ``pid_root`` they check that each TP rank maps memory of the process on its GPU."""
    from megatron_rlrt.rollout import registry
    from megatron_rlrt.rollout.sglang_engine import SGLangEngine

    class FakeLaunchSGLang(SGLangEngine):
        def _server_command(self, placement):
            cmd = [sys.executable, FAKE, "--port", str(placement.port), "--host", placement.host,
                   "--tp", str(placement.num_gpus), "--model-path", self.model_path,
                   "--expect-device", expect_device, "--weight-version", str(self.weight_version),
                   "--base-gpu-id", str(placement.base_gpu)]
            if pid_root:
                cmd += ["--device-pid-dir", device_pid_dir(pid_root)]
            if self.colocate:
                cmd.append("--enable-memory-saver")  # what sglang_server_command adds when colocated
            return cmd, {"OMP_NUM_THREADS": "1"}

    def factory(cfg, hf_dir, tokenizer):
        from megatron_rlrt.rollout.registry import _server_kwargs

        node = int(os.environ.get("GROUP_RANK", "0"))  # 2 'nodes' on one host: no port race
        return FakeLaunchSGLang(**_server_kwargs(cfg, hf_dir), weight_sync=cfg.weight_sync,
                                router_url=cfg.rollout_router_url, base_port=31000 + 200 * node, backoff_s=0.05,
                                startup_timeout_s=120)

    registry.register_engine("sglang", factory, servers=True)


def fleet_rank(argv: list[str], out_dir: str, sabotage: str = "") -> None:
    """Train ``argv``; write ``out_dir/result.json`` (rank 0) with per-step metrics, the servers'
    state seen at every optimizer step, and ``out_dir/trainer.safetensors`` (the final weights).

    ``sabotage``: ``no-release`` (the trainer never releases the servers' memory),
    ``skip-param`` (one parameter left out of every update), ``cuda-servers`` (the servers'
    weights live on a GPU, the trainer hands them CPU memory), ``one-sender`` (local rank 0's
    handle to every engine TP rank, the mapping before per-rank handles). The error is recorded
    instead."""
    from megatron_rlrt.rollout.sglang_engine import SGLangEngine
    from megatron_rlrt.rollout import fleet, registry, weight_sync
    from tests.helpers.trainer_helpers import register_test_rewards

    register_test_rewards()
    # a 1-rank spawn runs in the test process: everything patched here is put back at the end
    saved = (registry.ENGINES["sglang"], set(registry.SERVER_ENGINES), fleet.RolloutFleet.release,
             weight_sync.iter_hf_tensors, SGLangEngine._handles_for)
    # the servers' weights live where the trainer's do (on a GPU machine: CUDA IPC for real)
    device = "cuda" if torch.cuda.is_available() or sabotage == "cuda-servers" else "cpu"
    note_device_pid(out_dir)
    register_fake_sglang(device, pid_root=out_dir)
    if sabotage == "one-sender":
        SGLangEngine._handles_for = lambda self, url, handles: [handles[0]] * self.engine_tp_size(url)
    if sabotage == "no-release":
        fleet.RolloutFleet.release = lambda self: None
    if sabotage == "skip-param":
        real = weight_sync.iter_hf_tensors

        def all_but_one(chunks, spec):
            for name, tensor in real(chunks, spec):
                if name != "model.norm.weight":
                    yield name, tensor

        weight_sync.iter_hf_tensors = all_but_one
    try:
        _run(argv, out_dir, sabotage)
    finally:
        registry.ENGINES["sglang"], fleet.RolloutFleet.release, weight_sync.iter_hf_tensors = \
            saved[0], saved[2], saved[3]
        SGLangEngine._handles_for = saved[4]
        registry.SERVER_ENGINES.clear()
        registry.SERVER_ENGINES.update(saved[1])


def _run(argv: list[str], out_dir: str, sabotage: str) -> None:
    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.rollout.weight_sync import gather_hf_weights
    from megatron_rlrt.trainer.trainer import Trainer

    os.makedirs(out_dir, exist_ok=True)
    result: dict = {"error": None, "during_train": [], "steps": []}
    trainer = None
    try:
        trainer = Trainer(parse_config(argv))
        urls = [u for node in trainer.fleet.urls_by_node for u in node] if dist.get_rank() == 0 else []
        result["urls"] = urls
        step_fn = trainer.optimizer.step
        # this node's servers (the ones sharing this rank's GPUs), seen from its sender rank
        own = trainer.fleet.local_urls
        seen: list = []

        def step_and_look(*a, **k):  # the servers' memory while the trainer holds the GPUs
            seen.append({u: fake_state(u)["released"] for u in own})
            return step_fn(*a, **k)

        trainer.optimizer.step = step_and_look
        for s in range(trainer.cfg.train_iters):
            result["steps"].append(trainer.step(s))
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, (seen, os.getpid(), os.environ.get("GROUP_RANK", "0")))
        result["during_train"] = [snap for per_rank, _, _ in every for snap in per_rank if snap]
        result["ranks"] = [{"pid": pid, "node": int(node)} for _, pid, node in every]
        if dist.get_rank() == 0:
            result["version"] = trainer.fleet.engine.weight_version
        stream = gather_hf_weights(trainer.chunks, trainer.arch, [0], "cpu")
        named = {n: t.contiguous() for n, t in stream}
        if dist.get_rank() == 0:
            from safetensors.torch import save_file

            save_file(named, os.path.join(out_dir, "trainer.safetensors"))
            result["servers"] = {u: fake_state(u) for u in urls}
            for i, u in enumerate(urls):
                req = urllib.request.Request(u + "/_fake/dump", method="POST",
                                             data=json.dumps({"path": os.path.join(out_dir, f"server{i}.safetensors")}
                                                             ).encode(), headers={"Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=60).close()
        dist.barrier()  # the other nodes keep their servers up until rank 0 has read them
    except Exception as exc:  # recorded for the test (sabotaged runs must fail)
        result["error"] = f"{type(exc).__name__}: {exc}"
        if not sabotage:
            raise
    finally:
        if trainer is not None:
            trainer.close()
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
    parallel.destroy(barrier=False)


if __name__ == "__main__":  # under torchrun: python -m tests.helpers.fleet_helpers SPEC.json
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(1)
    fleet_rank(spec["argv"], spec["out_dir"], spec.get("sabotage", ""))


def gather_rank(hf_dir: str, pp: int, receivers: list[int], out_dir: str) -> None:
    """Load ``hf_dir`` at PP=``pp``; every receiver writes what ``gather_hf_weights`` gave it."""
    from safetensors.torch import save_file

    from megatron_rlrt import parallel
    from megatron_rlrt.models.hf_checkpoint import load_hf_weights
    from megatron_rlrt.models.megatron_checkpoint import load_hf_into_model
    from megatron_rlrt.models.qwen3 import Qwen3Spec, build_model, transformer_config
    from megatron_rlrt.rollout.weight_sync import gather_hf_weights

    parallel.initialize(parallel.ParallelLayout(1, pp))
    spec = Qwen3Spec.from_hf_dir(hf_dir)
    config = transformer_config(spec, pipeline_model_parallel_size=pp, params_dtype=torch.float32,
                                perform_initialization=False)
    chunks = build_model(spec, config)
    load_hf_into_model(chunks, spec, load_hf_weights(hf_dir, spec))
    got = {n: t.contiguous() for n, t in gather_hf_weights(chunks, spec, receivers, "cpu")}
    if dist.get_rank() in receivers:
        save_file(got, os.path.join(out_dir, f"rank{dist.get_rank()}.safetensors"))
    else:
        assert not got
    parallel.destroy()
