"""SGLangEngine over real HTTP on loopback against fake SGLang servers (tests/helpers/fake_sglang_server.py,
separate processes that validate every body against SGLang 0.5.23's recorded field lists):
generation with n samples and log-probs, retries, re-dispatch of a dead engine's requests, the
"all engines gone" error, refused payloads, and the three weight-sync paths (disk, distributed
broadcast over a real gloo group the way SGLang joins it, and the begin/end session rules)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from megatron_rlrt.rollout.base import RolloutError, SamplingParams, iter_weight_buckets
from megatron_rlrt.rollout.launch import find_free_port
from megatron_rlrt.rollout.sglang_engine import SGLangEngine

pytestmark = pytest.mark.slow  # spawns ranks or servers: `-m "not slow"` skips it

HERE = os.path.dirname(os.path.abspath(__file__))
_NEXT_PORT = [31500]


class FakeServer:
    def __init__(self, *flags: str):
        self.port = find_free_port(_NEXT_PORT[0])
        _NEXT_PORT[0] = self.port + 1
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "helpers", "fake_sglang_server.py"),
                                      "--port", str(self.port), *flags], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(self):
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake server died: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("fake server did not start")

    def state(self) -> dict:
        with urllib.request.urlopen(self.url + "/_fake/state", timeout=5) as r:
            return json.load(r)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def fakes():
    started: list[FakeServer] = []

    def start(*flag_sets):
        servers = [FakeServer(*flags) for flags in flag_sets]
        started.extend(servers)
        return [s.wait() for s in servers]

    yield start
    for s in started:
        s.kill()


def engine(servers, **kw) -> SGLangEngine:
    kw.setdefault("progress", False)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("weight_sync", "disk")
    return SGLangEngine(rollout_urls=",".join(s.url for s in servers), **kw)


PARAMS = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9)
PROMPTS = [[i + 1, i + 2, i + 3] for i in range(12)]


def test_generate_n_samples_over_two_engines(fakes):
    a, b = fakes((), ())
    eng = engine([a, b])
    out = eng.generate(PROMPTS, 3, PARAMS)
    assert len(out) == len(PROMPTS) and all(len(g) == 3 for g in out)
    for i, group in enumerate(out):
        for k, s in enumerate(group):
            assert s.prompt_index == i and len(s.response_ids) == 6 == len(s.logprobs)
            assert s.response_ids[0] == (sum(PROMPTS[i]) + 7 * k) % 997
            assert s.finish_reason == "length" and s.logprobs[0] == pytest.approx(-0.01 - 0.001 * k)
    assert a.state()["generate_count"] > 0 and b.state()["generate_count"] > 0  # both engines used
    assert eng.metrics["perf/rollout_tokens_per_s"] > 0
    # stop token ids end a sample with finish_reason "stop"; per-sample seeds use the batch form
    stop = (sum(PROMPTS[0]) + 3) % 997
    out = eng.generate(PROMPTS[:1], 2, SamplingParams(max_new_tokens=6, stop_token_ids=(stop,), seed=5))
    assert [s.finish_reason for s in out[0]] == ["length", "length"]  # seeds shift the fake's tokens
    out = eng.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=6, stop_token_ids=(stop,)))
    assert out[0][0].finish_reason == "stop" and out[0][0].response_ids[-1] == stop
    eng.shutdown()


def test_retries_then_success_and_aborted_answers_are_retried(fakes):
    (a,) = fakes(("--fail-first", "2", "--abort-first", "2"))
    eng = engine([a], max_attempts=6)
    out = eng.generate(PROMPTS[:2], 2, PARAMS)
    assert all(len(g) == 2 and all(s.finish_reason == "length" for s in g) for g in out)
    assert a.state()["generate_count"] >= 6


def test_dead_engine_requests_are_redispatched(fakes):
    a, b = fakes(("--die-after", "3", "--delay", "0.05"), ("--delay", "0.05"))
    eng = engine([a, b], max_inflight_per_engine=2)
    out = eng.generate(PROMPTS, 2, PARAMS)
    assert [len(g) for g in out] == [2] * len(PROMPTS)
    assert [s.response_ids[0] for g in out for s in g] == [(sum(p) + 7 * k) % 997 for p in PROMPTS for k in range(2)]
    health = eng.health()
    assert health["live_engines"] == 1 and not health["engines"][0]["alive"]
    assert "gone" not in health["engines"][1]["error"]


def test_all_engines_gone_is_a_clear_error(fakes):
    a, b = fakes(("--die-after", "1"), ("--die-after", "1"))
    eng = engine([a, b])
    with pytest.raises(RolloutError, match="all 2 rollout engines are gone"):
        eng.generate(PROMPTS, 2, PARAMS)
    with pytest.raises(RolloutError, match="gone"):
        eng.health()


def test_refused_payload_fails_fast(fakes):
    (a,) = fakes(("--reject-generate",))
    eng = engine([a], max_attempts=5)
    t0 = time.time()
    with pytest.raises(RolloutError, match="refused"):
        eng.generate(PROMPTS[:3], 1, PARAMS)
    assert time.time() - t0 < 30  # not 5 attempts with back-off (loose: CI machines are busy)
    assert a.state()["generate_count"] == 0  # no retry of a payload the server refused


def _bucketed(named, size=4096):
    return list(iter_weight_buckets(named, size))


def _named_tensors():
    g = torch.Generator().manual_seed(0)
    return [("model.embed_tokens.weight", torch.randn(64, 16, generator=g).to(torch.bfloat16)),
            ("model.layers.0.self_attn.q_proj.weight", torch.randn(16, 16, generator=g).to(torch.bfloat16)),
            ("model.norm.weight", torch.rand(7, generator=g)),  # odd-sized fp32 after bf16: one dtype per broadcast
            ("model.layers.0.mlp.down_proj.weight", torch.randn(16, 33, generator=g).to(torch.bfloat16))]


def _checksums(named):
    import hashlib

    return {n: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest() for n, t in named}


def test_weight_update_from_disk_then_version_checked(fakes, tmp_path):
    a, b = fakes((), ())
    eng = engine([a, b], weight_sync="disk", weight_sync_dir=str(tmp_path))
    named = _named_tensors()
    eng.update_weights(_bucketed(named), version=3)
    assert eng.weight_version == 3 and eng.served_weight_versions() == {a.url: "3", b.url: "3"}
    for s in (a, b):
        st = s.state()
        assert st["weights"] == _checksums(named)
        assert st["calls"].index("flush_cache", st["calls"].index("update_weights_from_disk")) > 0
    assert os.listdir(tmp_path) == ["v3"]
    eng.update_weights(_bucketed(named), version=4)
    assert os.listdir(tmp_path) == ["v4"]  # the previous snapshot is removed
    out = eng.generate(PROMPTS[:2], 1, PARAMS)
    assert out[0][0].meta["weight_version"] == "4"


def test_weight_update_distributed_broadcast_over_a_real_group(fakes):
    a, b = fakes((), ())
    eng = engine([a, b], weight_sync="distributed", group_backend="gloo", master_address="127.0.0.1")
    named = _named_tensors()
    eng.update_weights(_bucketed(named, size=2048), version=1)
    for s in (a, b):
        st = s.state()
        assert st["weights"] == _checksums(named) and st["version"] == "1"
        calls = [c for c in st["calls"] if c != "generate"]
        assert calls[0] == "init_weights_update_group" and calls[1] == "begin_weight_update"
        assert calls.index("end_weight_update") > max(i for i, c in enumerate(calls)
                                                      if c == "update_weights_from_distributed")
    named2 = [(n, t + 1) for n, t in named]
    eng.update_weights(_bucketed(named2), version=2)  # the group is reused
    assert a.state()["weights"] == _checksums(named2) and eng.weight_version == 2
    assert a.state()["calls"].count("init_weights_update_group") == 1
    eng.shutdown()


def test_failed_update_marks_engine_dead_or_fails_the_step(fakes, tmp_path):
    a, b = fakes((), ("--fail-update",))
    eng = engine([a, b], weight_sync="disk", weight_sync_dir=str(tmp_path))
    eng.update_weights(_bucketed(_named_tensors()), version=1)
    assert eng.weight_version == 1 and eng.live_urls() == [a.url]
    out = eng.generate(PROMPTS, 1, PARAMS)  # everything goes to the engine with the new weights
    assert all(s.meta["engine"] == a.url for g in out for s in g)

    c, d = fakes((), ("--fail-update",))
    strict = engine([c, d], weight_sync="disk", weight_sync_dir=str(tmp_path / "s"), min_live_engines=2)
    with pytest.raises(RolloutError, match="only 1 live engine"):
        strict.update_weights(_bucketed(_named_tensors()), version=1)
    assert strict.weight_version == 0  # the step did not happen


def test_stale_engine_is_dropped_from_generation(fakes, tmp_path):
    a, b = fakes((), ())
    eng = engine([a, b], weight_sync="disk", weight_sync_dir=str(tmp_path))
    eng.update_weights(_bucketed(_named_tensors()), version=2)
    # simulate an engine that silently went back to old weights
    c = fakes(("--stale",))[0]
    eng2 = engine([a, c], weight_sync="disk", weight_sync_dir=str(tmp_path / "x"))
    eng2.weight_version, eng2._version_known = 2, True
    out = eng2.generate(PROMPTS, 1, PARAMS)
    assert all(s.meta["engine"] == a.url for g in out for s in g)
    assert eng2.live_urls() == [a.url]


def _model_dir(tmp_path, named) -> str:
    """A 'checkpoint' whose tensors the enforcing fake expects every update to deliver."""
    from safetensors.torch import save_file

    path = tmp_path / "model"
    path.mkdir(exist_ok=True)
    save_file({n: t.contiguous() for n, t in named}, str(path / "model.safetensors"))
    return str(path)


def _violations(*servers) -> list[str]:
    return [v for s in servers for v in s.state()["violations"]]


def test_colocated_step_cycle_in_slimes_order_with_the_tensor_transport(fakes, tmp_path):
    """release -> resume weights -> update (CPU tensors shared, not copied) -> resume KV cache ->
    generate -> release, twice, against servers that refuse any other order; the fake rebuilds
    the state dict from the shared buffers."""
    from safetensors.torch import load_file

    from megatron_rlrt.rollout.base import KV_CACHE, WEIGHTS

    named = _named_tensors()
    model = _model_dir(tmp_path, named)
    a, b = fakes(("--enable-memory-saver", "--model-path", model), ("--enable-memory-saver", "--model-path", model))
    eng = engine([a, b], colocate=True, weight_sync="auto")
    assert eng.weight_sync == "tensor" and eng.transport.device == torch.device("cpu")
    eng.release_memory()  # the trainer's first training phase
    for version in (1, 2):
        named = [(n, t + version) for n, t in named]
        eng.resume_memory([WEIGHTS])
        eng.update_weights(_bucketed(named, size=2048), version=version)
        eng.resume_memory([KV_CACHE])
        out = eng.generate(PROMPTS[:4], 2, PARAMS)
        assert {s.meta["weight_version"] for g in out for s in g} == {str(version)}
        eng.release_memory()
    assert _violations(a, b) == []
    for s in (a, b):
        st = s.state()
        assert st["released"] == [KV_CACHE, WEIGHTS] and st["version"] == "2"
        assert st["weights"] == _checksums(named)
        calls = st["calls"]
        end = len(calls) - 1 - calls[::-1].index("end_weight_update")
        assert calls.index("flush_cache", end) < calls.index("generate", end)
        s_path = tmp_path / f"dump_{s.port}.safetensors"
        req = urllib.request.Request(s.url + "/_fake/dump", data=json.dumps({"path": str(s_path)}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=10).close()
        rebuilt = load_file(str(s_path))
        assert sorted(rebuilt) == sorted(n for n, _ in named)
        for n, t in named:
            assert rebuilt[n].dtype == t.dtype and torch.equal(rebuilt[n], t), n
    eng.shutdown()


def test_the_fake_enforces_what_a_colocated_server_needs(fakes, tmp_path, monkeypatch):
    """Each rule broken once: the step fails with the server's refusal."""
    from megatron_rlrt.rollout import sglang_protocol as sp
    from megatron_rlrt.rollout.base import KV_CACHE, WEIGHTS

    named = _named_tensors()
    model = _model_dir(tmp_path, named)
    flags = ("--enable-memory-saver", "--model-path", model)

    def fresh(*extra):
        (srv,) = fakes(flags + extra)
        return srv, engine([srv], colocate=True, weight_sync="tensor", max_attempts=1)

    srv, eng = fresh()
    eng.release_memory()
    with pytest.raises(RolloutError):  # generate with released weights and KV cache
        eng.generate(PROMPTS[:1], 1, PARAMS)
    assert "generate while ['kv_cache', 'weights'] released" in _violations(srv)[-1]

    srv, eng = fresh()
    eng.release_memory()
    with pytest.raises(RolloutError):  # a weight update into released weights
        eng.update_weights(_bucketed(named), version=1)
    assert "into released weights" in _violations(srv)[0]

    srv, eng = fresh()
    eng.release_memory()
    with pytest.raises(RolloutError):  # the KV cache before the weights
        eng.resume_memory([KV_CACHE])
    assert "before the KV cache" in _violations(srv)[-1]

    srv, eng = fresh()
    with pytest.raises(RolloutError):  # the trainer never released: nothing to resume
        eng.resume_memory([WEIGHTS])
    assert "not released" in _violations(srv)[-1]

    srv, eng = fresh()
    with pytest.raises(RolloutError):  # a parameter skipped
        eng.update_weights(_bucketed(named[:-1]), version=1)
    assert "delivered 3 of 4 parameters" in _violations(srv)[-1]

    srv, eng = fresh()
    wrong = [(n, t.to(torch.float16) if n == "model.norm.weight" else t) for n, t in named]
    with pytest.raises(RolloutError):  # a wrong dtype
        eng.update_weights(_bucketed(wrong), version=1)
    assert "model.norm.weight: got shape/dtype" in _violations(srv)[-1]

    srv, eng = fresh("--expect-device", "cuda")
    with pytest.raises(RolloutError):  # CPU tensors to a server whose weights live on the GPU
        eng.update_weights(_bucketed(named), version=1)
    assert "tensors on cpu, the engine's device is cuda" in _violations(srv)[-1]

    srv, eng = fresh()
    eng.transport.device = torch.device("meta")  # tensors not on the transport's device never leave
    with pytest.raises(RolloutError, match="gather onto the training device"):
        eng.update_weights(_bucketed(named), version=1)

    srv, eng = fresh()

    def by_value(flat, metadata):  # the bucket's bytes copied into the request, no handle
        import base64
        import pickle

        return base64.b64encode(pickle.dumps({"flattened_tensor": flat.clone(), "metadata": list(metadata)})).decode()

    monkeypatch.setattr(sp, "serialize_flattened_bucket", by_value)
    with pytest.raises(RolloutError):
        eng.update_weights(_bucketed(named), version=1)
    # SGLang's SafeUnpickler has no global that rebuilds a tensor from bytes
    # torch.storage._load_from_bytes, or megatron.core.safe_globals' wrapper once megatron is imported
    assert re.search(r"SGLang would block \S*load_from_bytes", _violations(srv)[-1])
    monkeypatch.undo()

    srv, eng = fresh()
    monkeypatch.setattr(eng, "flush_cache", lambda *a, **k: None)  # an update without flush_cache
    eng.update_weights(_bucketed(named), version=1)
    with pytest.raises(RolloutError):
        eng.generate(PROMPTS[:1], 1, PARAMS)
    assert "without flush_cache" in _violations(srv)[-1]


def test_tensor_updates_only_inside_a_session(fakes):
    (a,) = fakes(())
    # tensor updates outside a begin/end session are refused, as SGLang 0.5.23 does
    import urllib.error

    req = urllib.request.Request(a.url + "/update_weights_from_tensor", method="POST",
                                 data=json.dumps({"serialized_named_tensors": ["AA=="]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(req, timeout=5)
