"""Whole RL steps through SGLangEngine in every placement, against fake SGLang servers over HTTP
that enforce what a real server needs (tests/helpers/fake_sglang_server.py): colocated on one node,
colocated on two 'nodes' (two torchrun agents, --nnodes 2 on loopback), disaggregated by URL
(broadcast group), disaggregated behind a router (disk snapshots). After the steps each server's
rebuilt state dict must equal the trainer's weights, tensor for tensor."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

from megatron_rlrt import parallel
from tests.helpers.fleet_helpers import fleet_rank

pytestmark = pytest.mark.slow  # spawns ranks or servers: `-m "not slow"` skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
BUCKET = 64 * 1024  # bytes: the tiny model's weights in several buckets


def _argv(model, data, *extra):
    return ["--hf-checkpoint", model, "--prompt-data", data, "--reward", "hash_parity", "--rollout-engine", "sglang",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "4",
            "--train-iters", str(STEPS), "--lr", "1e-2", "--lr-warmup-iters", "0", "--global-batch-size", "4",
            "--no-progress", "--no-tensorboard", "--advantage-estimator", "grpo", *extra]


def _result(out) -> dict:
    return json.loads((out / "result.json").read_text())


def _check_weights(out, n_servers: int, initial: str) -> None:
    """Every server holds exactly the trainer's final weights (names, shapes, dtypes, values),
    and they moved away from the checkpoint the servers were launched with."""
    trainer = load_file(str(out / "trainer.safetensors"))
    start = {}
    for f in os.listdir(initial):
        if f.endswith(".safetensors"):
            start.update(load_file(os.path.join(initial, f)))
    assert sorted(trainer) == sorted(start)
    assert any(not torch.equal(trainer[n], start[n]) for n in trainer), "training changed nothing"
    for i in range(n_servers):
        served = load_file(str(out / f"server{i}.safetensors"))
        assert sorted(served) == sorted(trainer)
        for name, t in trainer.items():
            assert served[name].dtype == t.dtype and served[name].shape == t.shape, name
            assert torch.equal(served[name], t), name


def _check_updates(state: dict, updates: int) -> None:
    """Each update: a begin/end session (or a disk load), then the version, then flush_cache
    before the next generate; the server reports the last version."""
    calls = state["calls"]
    assert state["violations"] == []
    assert state["version"] == str(STEPS)
    ends = [i for i, c in enumerate(calls) if c in ("end_weight_update", "update_weights_from_disk")]
    assert len(ends) == updates, calls
    for i in ends:
        later = calls[i:]
        assert "update_weight_version" in later and "flush_cache" in later
        if "generate" in later:
            assert later.index("flush_cache") < later.index("generate")


def _colocated_cycle(state: dict) -> None:
    """slime's order, per step: resume weights -> update -> resume KV cache -> generate -> release."""
    calls = [c for c in state["calls"] if c in ("resume_memory_occupation", "release_memory_occupation",
                                                  "begin_weight_update", "end_weight_update", "generate")]
    collapsed = [c for i, c in enumerate(calls) if c != "generate" or (i and calls[i - 1] != "generate")]
    one = ["resume_memory_occupation", "begin_weight_update", "end_weight_update", "resume_memory_occupation"]
    # start-up: released; then per step: refresh, generate, release; a final refresh after the last step
    assert collapsed == ["release_memory_occupation"] + (one + ["generate", "release_memory_occupation"]) * STEPS \
        + one, collapsed


def test_colocated_one_node(tiny_model, arithmetic_data, tmp_path):
    """2 ranks (PP=2: each gathers the other stage's tensors) share 'the node' (2 'GPUs',
    LOCAL_WORLD_SIZE=2) with one TP=2 server; its TP rank i maps the shared CPU memory of the rank
    on 'GPU' i only; the server is released while training."""
    out = tmp_path / "out"
    # small buckets: several per update, so every rank's per-bucket handle exchange interleaves
    # with the point-to-point gather across the pipeline stages
    parallel.spawn(fleet_rank, 2, _argv(tiny_model, arithmetic_data, "--colocate", "--rollout-num-gpus-per-engine",
                                         "2", "--pipeline-model-parallel-size", "2", "--update-weight-buffer-size",
                                         str(BUCKET)), str(out))
    r = _result(out)
    assert r["error"] is None and len(r["steps"]) == STEPS and r["version"] == STEPS
    assert all(m["actor/grad_norm"] > 0 for m in r["steps"])
    (url,) = r["urls"]
    assert r["during_train"] and all(seen == {url: ["kv_cache", "weights"]} for seen in r["during_train"])
    state = r["servers"][url]
    _check_updates(state, STEPS + 1)
    _colocated_cycle(state)
    per_update = state["calls"].count("update_weights_from_tensor") / (STEPS + 1)
    assert per_update > 2, per_update  # several buckets per update
    pids = [rank["pid"] for rank in r["ranks"]]
    # TP rank i read only the shared memory of the training rank on its GPU i (not copied)
    assert state["senders_by_tp_rank"] == {"0": [pids[0]], "1": [pids[1]]}, (state["senders_by_tp_rank"], pids)
    _check_weights(out, 1, tiny_model)


@pytest.mark.parametrize("sabotage,expected", [
    ("no-release", "resume ['weights']: not released"),
    ("skip-param", "missing ['model.norm.weight']"),
    ("cuda-servers", "tensors on cpu, the engine's device is cuda"),
])
def test_colocated_step_fails_when_a_rule_is_broken(tiny_model, arithmetic_data, tmp_path, sabotage, expected):
    out = tmp_path / "out"
    parallel.spawn(fleet_rank, 1, _argv(tiny_model, arithmetic_data, "--colocate"), str(out), sabotage)
    r = _result(out)
    assert r["error"] is not None and expected in r["error"], r["error"]


def test_colocated_handles_must_come_from_each_engine_ranks_own_gpu(tiny_model, arithmetic_data, tmp_path):
    """Local rank 0's handle sent to every TP rank of a TP=2 server (the layout before per-rank
    handles) is refused: TP rank 1 must map the memory of the rank on its own GPU."""
    out = tmp_path / "out"
    parallel.spawn(fleet_rank, 2, _argv(tiny_model, arithmetic_data, "--colocate", "--rollout-num-gpus-per-engine",
                                         "2", "--tensor-model-parallel-size", "2"), str(out), "one-sender")
    r = _result(out)
    assert r["error"] is not None and "TP rank 1 (GPU 1) got shared memory of pid(s)" in r["error"], r["error"]


class _Fakes:
    def __init__(self, tmp_path):
        self.procs, self.tmp = [], tmp_path

    def start(self, *flags) -> str:
        from megatron_rlrt.rollout.launch import ServerProcess, find_free_port

        for attempt in range(5):
            port = find_free_port(32000 + 10 * len(self.procs) + 100 * attempt)
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, os.path.join(REPO, "tests", "helpers", "fake_sglang_server.py"), "--port", str(port),
                   *flags]
            proc = ServerProcess(f"fake {port}", cmd, {"OMP_NUM_THREADS": "1"},
                                 str(self.tmp / f"fake{port}.log")).start()
            self.procs.append(proc)
            proc.wait_healthy(url, path="/health", timeout_s=120)
            # another process may have taken the port first (and answered the health check)
            with urllib.request.urlopen(url + "/_fake/state", timeout=30) as resp:
                if json.load(resp).get("pid") == proc.pid:
                    return url
            proc.stop()
        raise RuntimeError("no free port for a fake server after 5 tries")

    def stop(self):
        for p in self.procs:
            p.stop()


@pytest.fixture
def fakes(tmp_path):
    f = _Fakes(tmp_path)
    yield f
    f.stop()


def test_disaggregated_by_url_broadcast_group(tiny_model, arithmetic_data, tmp_path, fakes):
    """Two running servers given by URL; weights by broadcast over a (gloo) group the servers
    join; nothing is released (the servers have their own GPUs)."""
    urls = [fakes.start("--model-path", tiny_model) for _ in range(2)]
    out = tmp_path / "out"
    parallel.spawn(fleet_rank, 2, _argv(tiny_model, arithmetic_data, "--rollout-urls", ",".join(urls),
                                         "--weight-sync", "distributed", "--tensor-model-parallel-size", "2"),
                   str(out))
    r = _result(out)
    assert r["error"] is None and r["version"] == STEPS
    for url in urls:
        state = r["servers"][url]
        _check_updates(state, STEPS + 1)
        assert state["generate_count"] > 0 and "release_memory_occupation" not in state["calls"]
        assert state["calls"].count("init_weights_update_group") == 1
    _check_weights(out, 2, tiny_model)


def test_disaggregated_behind_a_router_disk_snapshots(tiny_model, arithmetic_data, tmp_path, fakes):
    """/generate through the router, weight updates (disk snapshots) to every server directly."""
    workers = [fakes.start("--model-path", tiny_model) for _ in range(2)]
    router = fakes.start("--router-for", ",".join(workers))
    out = tmp_path / "out"
    parallel.spawn(fleet_rank, 1, _argv(tiny_model, arithmetic_data, "--rollout-urls", ",".join(workers),
                                         "--rollout-router-url", router, "--weight-sync", "disk",
                                         "--weight-sync-dir", str(tmp_path / "snapshots")), str(out))
    r = _result(out)
    assert r["error"] is None and r["version"] == STEPS
    for url in workers:
        state = r["servers"][url]
        _check_updates(state, STEPS + 1)
        assert state["generate_count"] > 0  # the router spread the prompts over both
    with __import__("urllib.request").request.urlopen(router + "/_fake/state", timeout=10) as resp:
        assert sum(json.load(resp)["forwarded"].values()) == STEPS * 2
    _check_weights(out, 2, tiny_model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_colocated_two_nodes_on_loopback(tiny_model, arithmetic_data, tmp_path):
    """Two torchrun agents (--nnodes 2, one rank each, DP=2): each node's local rank 0 launches
    its own server; rank 0 dispatches prompts over both; each server gets its weights from its
    own node's rank (shared memory of that rank), and both end with the trainer's weights."""
    out = tmp_path / "out"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"argv": _argv(tiny_model, arithmetic_data, "--colocate"), "out_dir": str(out)}))
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "tests.helpers.fleet_helpers", str(spec)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    r = _result(out)
    assert r["error"] is None and r["version"] == STEPS and len(r["urls"]) == 2
    assert r["urls"][0] != r["urls"][1]
    for url in r["urls"]:
        state = r["servers"][url]
        assert state["generate_count"] > 0, f"{url} never generated"
        _check_updates(state, STEPS + 1)
        _colocated_cycle(state)
        assert "update_weights_from_tensor" in state["calls"]
    # each server read its updates from the shared memory of its own node's rank, and only that
    for node, url in enumerate(r["urls"]):
        own = [rank["pid"] for rank in r["ranks"] if rank["node"] == node]
        assert r["servers"][url]["shm_senders"] == own, (node, url, r["ranks"])
    # while each node trains, its own server holds no memory (every node checked: both URLs seen)
    assert {u for seen in r["during_train"] for u in seen} == set(r["urls"])
    assert all(v == ["kv_cache", "weights"] for seen in r["during_train"] for v in seen.values())
    _check_weights(out, 2, tiny_model)
