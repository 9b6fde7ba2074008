"""SGLang rollout engine (the cluster default): SGLang servers over HTTP, many engines, weight sync.

Written against SGLang 0.5.23 and sglang-router 0.3.2 (see ``sglang_protocol`` for the files
read). Every body sent is built in ``sglang_protocol``.

Placement
- colocated (``colocate=True``): one server per ``rollout_num_gpus_per_engine`` training GPUs of
  this node, launched with ``--enable-memory-saver``. The trainer drives the memory by tag
  (``release_memory(tags)`` / ``resume_memory(tags)``, tags ``weights`` and ``kv_cache``) in
  slime's order; see ``rollout/fleet.py``.
- disaggregated: servers on dedicated GPUs/nodes, launched here (``rollout_first_gpu``) or
  started per node with ``python -m megatron_rlrt.rollout.launch sglang ...`` and given as
  ``rollout_urls``.
- many engines: data-parallel rollout through our least-loaded dispatch (default), or through
  sglang-router (``use_router=True`` launches ``sglang_router.launch_router`` over the engines;
  ``router_url=`` uses a running one). Control requests (weights, cache, memory) always go to
  every engine directly.

Generation: ``POST /generate`` with ``input_ids``, ``sampling_params`` (temperature, top_p, top_k,
max_new_tokens, stop_token_ids, n or per-sample seeds) and ``return_logprob``; the sampler's
per-token log-probs come back in ``meta_info.output_token_logprobs``. By default SGLang reports
log-probs of the temperature-scaled distribution; ``logprobs="raw"`` launches the servers with
``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` (pre-temperature). After the first weight update, an
answer from an engine that reports another weight version marks that engine dead.

Weight sync (``weight_sync``; "auto" = "tensor" when colocated, "distributed" when disaggregated
on CUDA, else "disk"): this class holds only the HTTP half (begin/end session, the per-bucket
requests, version, flush); how the tensors travel (IPC handles, a broadcast group, a snapshot)
is ``weight_transport.py``. After every update the cache is flushed and every engine must
report the new version (``/model_info``).

Pipeline parallelism: ``update_weights`` sends what it is given. For PP>1 either bring every
stage's tensors to one sender, or call ``begin_update(version)`` once (trainer rank 0),
``send_buckets(buckets, version)`` on each stage's owner in turn (each owner holds its own
``SGLangEngine(rollout_urls=..., sender_id=pp_rank)``; "distributed" gives every sender its own
NCCL group), and ``finish_update(version)`` once.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import timedelta
from typing import Iterable, Sequence

import aiohttp
import torch

from megatron_rlrt.rollout import http_client as hc
from megatron_rlrt.rollout import sglang_protocol as sp
from megatron_rlrt.rollout.base import MEMORY_TAGS, RolloutError, RolloutSample
from megatron_rlrt.rollout.launch import EnginePlacement, ServerProcess, find_free_port, sglang_router_command
from megatron_rlrt.rollout.server_engine import DEFAULT_BUCKET_BYTES, ServerEngineBase, parse_urls
from megatron_rlrt.rollout.weight_transport import (DiskTransport, DistributedTransport, make_transport,
                                                    resolve_weight_sync)


def init_weights_update_group(master_address: str, master_port: int, rank: int, world_size: int,
                              group_name: str, backend: str = "nccl", timeout_s: float = 600.0):
    """Join a process group that is NOT the default one, exactly as SGLang's engines do
    (``sglang.srt.utils.common.init_custom_process_group``: tcp rendezvous, ``PrefixStore(group_name)``,
    ``_new_process_group_helper``), so trainer and engines meet in the same store keys."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                              timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      backend_options=None, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def this_host_address() -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class SGLangEngine(ServerEngineBase):
    """Rollout through SGLang servers. Constructor kwargs (trainer flag in brackets):

    - ``model_path``: HF checkpoint the launched servers load (and whose config files go into disk
      snapshots).
    - ``rollout_urls`` [``--rollout-urls``]: comma-separated URLs of running SGLang servers; nothing
      is launched.
    - ``colocate`` [``--colocate``]: share the training GPUs (memory saver, release/resume).
    - ``rollout_num_gpus_per_engine`` [``--rollout-num-gpus-per-engine``]: TP size of each engine
      (for connected servers: the TP size they run with, needed to size the NCCL group).
    - ``rollout_num_gpus``: GPUs of this node for the launched engines (default: all visible);
      ``rollout_first_gpu``: the first of them.
    - ``update_weight_buffer_size`` [``--update-weight-buffer-size``]: bytes per weight bucket
      (default 512 MiB).
    - ``weight_sync``: "auto" | "tensor" | "distributed" | "disk" (see module doc);
      ``weight_sync_dir``: snapshot directory for "disk" (shared storage across nodes).
    - ``use_router`` / ``router_url`` / ``router_policy``: sglang-router in front of the engines.
    - ``mem_fraction_static``, ``dtype``, ``logprobs`` ("processed" | "raw"), ``extra_server_args``,
      ``server_env``, ``python`` (interpreter with SGLang), ``master_address`` (this node's address
      the engines reach for the NCCL group), ``sender_id`` (PP stage of this sender),
      ``group_backend`` (default "nccl"; "gloo" for CPU tests), and the common
      ``ServerEngineBase`` ones (timeouts, retries, ``max_inflight_per_engine``,
      ``min_live_engines``, ``seed``, ``progress``, ``host``, ``base_port``, ``log_dir``).
    """

    name = "sglang"
    health_path = "/health"

    def __init__(self, *, model_path: str | None = None, rollout_urls=None, colocate: bool = False,
                 rollout_num_gpus: int | None = None, rollout_num_gpus_per_engine: int = 1,
                 update_weight_buffer_size: int = DEFAULT_BUCKET_BYTES, weight_sync: str = "auto",
                 use_router: bool = False, router_url: str | None = None, router_policy: str = "cache_aware",
                 mem_fraction_static: float | None = None, dtype: str | None = None, logprobs: str = "processed",
                 extra_server_args: Sequence[str] = (), server_env: dict | None = None, python: str | None = None,
                 master_address: str | None = None, sender_id: int = 0, group_backend: str | None = None,
                 **kwargs):
        if logprobs not in ("processed", "raw"):
            raise ValueError("logprobs must be 'processed' or 'raw'")
        if mem_fraction_static is not None and not 0.0 < float(mem_fraction_static) < 1.0:
            raise ValueError(f"mem_fraction_static={mem_fraction_static}: expected a fraction in (0, 1) of each GPU's "
                             f"memory for SGLang's weights + KV cache" + (
                                 " (colocated, the rest must hold the trainer's)" if colocate else ""))
        self.weight_sync = resolve_weight_sync(weight_sync, colocate)
        self.mem_fraction_static, self.dtype, self.logprobs = mem_fraction_static, dtype, logprobs
        self.extra_server_args, self.server_env = list(extra_server_args), dict(server_env or {})
        self.transport = make_transport(self.weight_sync, colocate, **(
            dict(backend=group_backend, master_address=master_address, sender_id=sender_id)
            if self.weight_sync == "distributed" else {}))
        self._router: ServerProcess | None = None
        self._version_known = False
        self._engine_tp: dict[str, int] = {}
        super().__init__(model_path=model_path, rollout_urls=rollout_urls, colocate=colocate,
                         rollout_num_gpus=rollout_num_gpus, rollout_num_gpus_per_engine=rollout_num_gpus_per_engine,
                         update_weight_buffer_size=update_weight_buffer_size, python=python or sys.executable,
                         **kwargs)
        self._version_known = self.launched  # launched with --weight-version
        try:
            if router_url:
                self.gen_pool = hc.EndpointPool(parse_urls(router_url), health_path="/health", policy=self.policy)
            elif use_router:
                self._start_router(router_policy)
        except BaseException:
            self.shutdown()
            raise

    # --- launch ---------------------------------------------------------------------------

    def _server_command(self, placement: EnginePlacement) -> tuple[list[str], dict]:
        from megatron_rlrt.rollout.launch import sglang_server_command

        cmd = sglang_server_command(
            self.model_path, placement, python=self.python, mem_fraction_static=self.mem_fraction_static,
            enable_memory_saver=self.colocate, dtype=self.dtype, weight_version=str(self.weight_version),
            seed=self.seed, quantization=self.quantization, extra_args=self.extra_server_args)
        env = dict(self.server_env)
        if self.logprobs == "raw":
            env["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
        if self.colocate:  # SGLang's memory saver does not support expandable segments
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "")
        return cmd, env

    def _start_router(self, policy: str) -> None:
        host = self.placements[0].host if self.placements else "127.0.0.1"
        port = find_free_port(29000)
        cmd = sglang_router_command(self.urls, host, port, python=self.python, policy=policy)
        self._router = ServerProcess("sglang-router", cmd, {}, os.path.join(self.log_dir, "sglang_router.log")).start()
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self._router.wait_healthy(url, path="/health", timeout_s=self.startup_timeout_s)
        self.gen_pool = hc.EndpointPool([url], health_path="/health", policy=self.policy)

    def engine_tp_size(self, url: str) -> int:
        """TP size of an engine: from its placement, else ``/server_info``'s ``tp_size``, else the
        ``rollout_num_gpus_per_engine`` kwarg."""
        if url not in self._engine_tp:
            tp = next((p.num_gpus for p in self.placements if p.url == url), None)
            if tp is None:
                results = hc.run_sync(hc.call_all("GET", [url], "/server_info", policy=self.control_policy))
                body = results[0].body if results[0].ok else None
                tp = int(body.get("tp_size", self.num_gpus_per_engine)) if isinstance(body, dict) else None
            self._engine_tp[url] = tp or self.num_gpus_per_engine
        return self._engine_tp[url]

    # --- generation ---------------------------------------------------------------------

    def _generate_body(self, index: int, prompt: Sequence[int], n: int, params) -> dict:
        seed = self._sample_seed(index, n, params)
        if seed is None or n == 1:
            return sp.GenerateRequest.build(prompt, params, n, seed=seed).to_json()
        # Per-sample seeds: a batch of n copies, each with its own seed (one sampling_seed with
        # n>1 would give every copy the same stream).
        one = sp.GenerateRequest.build(prompt, params, 1)
        body = one.to_json()
        body["input_ids"] = [list(one.input_ids) for _ in range(n)]
        body["sampling_params"] = [sp.sampling_params_json(params, 1, seed + k) for k in range(n)]
        return body

    async def _send_generate(self, session: aiohttp.ClientSession, endpoint: hc.Endpoint, job) -> list[RolloutSample]:
        (index, prompt), n, params = job
        body = self._generate_body(index, prompt, n, params)
        async with session.post(endpoint.url + sp.path("generate"), json=body) as resp:
            text = await resp.text()
            hc.raise_for_status(resp.status, text)
            try:
                samples = sp.parse_generate_response(hc._json_or_text(text), n, index, endpoint.url)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise hc.RetryableResponse(f"bad /generate answer for prompt {index}: {exc}") from exc
        if self._version_known and self.gen_pool is self.pool:
            versions = {s.meta.get("weight_version") for s in samples} - {None}
            if versions and versions != {str(self.weight_version)}:
                raise hc.EngineUnusable(f"serves weight version {sorted(versions)}, expected {self.weight_version}")
        return samples

    # --- cache, memory, versions --------------------------------------------------------

    def flush_cache(self, tries: int = 60) -> None:
        """``/flush_cache`` on every live engine; SGLang answers 400 while requests are pending, so
        retry for up to ``tries`` seconds; an engine that never flushes is marked dead."""
        pending = self.live_urls()
        for _ in range(tries):
            results = hc.run_sync(hc.call_all("POST", pending, sp.path("flush_cache"), policy=self.control_policy))
            pending = [r.url for r in results if not r.ok]
            if not pending:
                return
            time.sleep(1.0)
        for url in pending:
            self.pool.mark_dead(self._endpoint(url), "flush_cache never succeeded")
        self._require_live("flush_cache")

    def served_weight_versions(self) -> dict[str, str]:
        return {r.url: (r.body or {}).get("weight_version") for r in
                self._control("GET", sp.path("model_info"), what="model_info")}

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Colocated: free ``tags`` (default: weights and KV cache) on every live engine
        (``/release_memory_occupation``; SGLang flushes the cache itself when the KV cache goes)."""
        self._check_open()
        if self.colocate:
            self._control("POST", sp.path("release_memory_occupation"),
                          sp.ReleaseMemoryOccupationRequest(tags=list(tags or MEMORY_TAGS)).to_json(),
                          what="release_memory_occupation")

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Colocated: take ``tags`` back (``/resume_memory_occupation``); the trainer resumes the
        weights, updates them, then resumes the KV cache."""
        self._check_open()
        if self.colocate:
            self._control("POST", sp.path("resume_memory_occupation"),
                          sp.ResumeMemoryOccupationRequest(tags=list(tags or MEMORY_TAGS)).to_json(),
                          what="resume_memory_occupation")

    # --- weights: the HTTP half (the transport in weight_transport.py moves the tensors) ----

    def _send_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """Through ``self.transport`` (``disk`` calls the base's ``update_from_snapshot``)."""
        self.transport.update(self, buckets, version)

    def begin_update(self, version: int) -> None:
        """Open SGLang's weight-update session on every live engine (tensor / distributed)."""
        self._check_open()
        if isinstance(self.transport, DistributedTransport):
            self.transport.connect(self)
        self._control("POST", sp.path("begin_weight_update"), sp.BeginWeightUpdateRequest().to_json(),
                      what="begin_weight_update", tolerate=self.weight_sync != "distributed")

    def send_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """Send this process's HF-named tensors inside an open session (PP: one sender per stage)."""
        self._check_open()
        if isinstance(self.transport, DiskTransport):
            raise RolloutError("send_buckets does not apply to weight_sync='disk'")
        self.transport.send_buckets(self, self._outgoing(buckets), version)

    def abort_update(self) -> None:
        """Close a session a failed update left open (best effort; the original error matters)."""
        try:
            hc.run_sync(hc.call_all("POST", self.live_urls(), sp.path("end_weight_update"),
                                    sp.EndWeightUpdateRequest().to_json(),
                                    policy=hc.RetryPolicy(max_attempts=1, request_timeout_s=60)))
        except Exception:  # noqa: BLE001
            pass

    def finish_update(self, version: int) -> None:
        """Close the session, then ``_publish_version``."""
        self._control("POST", sp.path("end_weight_update"), sp.EndWeightUpdateRequest().to_json(),
                      what="end_weight_update", tolerate=self.weight_sync != "distributed")
        self._publish_version(version)

    def _publish_version(self, version: int) -> None:
        """Set the weight version, flush the caches (prefixes computed with the old weights),
        then every engine must report ``version``."""
        # The version is also sent with every bucket; setting it once more covers engines that
        # received no bucket from this sender (PP) and answers the question explicitly.
        self._control("POST", sp.path("update_weight_version"),
                      sp.UpdateWeightVersionRequest(new_version=str(version)).to_json(), what="update_weight_version")
        self.flush_cache()
        self._check_versions(version, self.served_weight_versions())
        self.note_version(version)

    def note_version(self, version: int) -> None:
        """From now on every /generate answer must come from weights ``version``."""
        self.weight_version = int(version)
        self._version_known = True

    def post_tensor_bucket(self, handles: Sequence[str], version: int) -> None:
        """``/update_weights_from_tensor`` on every live engine. ``handles[d]``: the bucket as
        serialized by the training process on this node's GPU ``d``; engine TP rank ``i`` gets the
        one of its own GPU ``i`` (SGLang deserializes ``serialized_named_tensors[tp_rank]`` on that
        rank). One handle (a single sender process) goes to every TP rank."""
        urls = self.live_urls()
        payloads = [sp.UpdateWeightsFromTensorRequest(serialized_named_tensors=self._handles_for(u, handles),
                                                      weight_version=str(version)).to_json() for u in urls]
        self._control("POST", sp.path("update_weights_from_tensor"), urls=urls, payloads=payloads,
                      what="update_weights_from_tensor")

    def _handles_for(self, url: str, handles: Sequence[str]) -> list[str]:
        tp = self.engine_tp_size(url)
        if len(handles) == 1:
            return [handles[0]] * tp
        placement = next((p for p in self.placements if p.url == url), None)
        if placement is None:
            raise RolloutError(f"per-GPU weight handles for {url}: only servers this engine launched have known GPUs")
        if placement.gpu_ids[-1] >= len(handles):
            raise RolloutError(f"engine {url} runs on GPUs {list(placement.gpu_ids)} but only {len(handles)} "
                               f"training ranks of this node sent weight handles")
        return [handles[g] for g in placement.gpu_ids]

    def _load_snapshot(self, snapshot: str, version: int) -> None:
        """``/update_weights_from_disk`` (no begin/end session: SGLang needs none for disk loads)."""
        payload = sp.UpdateWeightFromDiskRequest(model_path=snapshot, weight_version=str(version)).to_json()
        self._control("POST", sp.path("update_weights_from_disk"), payload, what="update_weights_from_disk")

    def post_init_weights_group(self, urls, address: str, port: int, offsets, world: int, group_name: str,
                                backend: str) -> None:
        """``/init_weights_update_group`` on ``urls`` (they block until the trainer joins)."""
        payloads = [sp.InitWeightsUpdateGroupRequest(
            master_address=address, master_port=port, rank_offset=off, world_size=world, group_name=group_name,
            backend=backend).to_json() for off in offsets]
        results = hc.run_sync(hc.call_all("POST", urls, sp.path("init_weights_update_group"), payloads=payloads,
                                          policy=self.control_policy))
        bad = [(r.url, r.error) for r in results if not r.ok]
        if bad:
            raise RolloutError(f"init_weights_update_group failed on {bad}")

    def post_distributed_bucket(self, urls, bucket, group_name: str, version: int) -> None:
        """``/update_weights_from_distributed``: the metadata of the bucket being broadcast."""
        payload = sp.UpdateWeightsFromDistributedRequest.for_bucket(
            bucket, group_name=group_name, weight_version=str(version)).to_json()
        results = hc.run_sync(hc.call_all("POST", urls, sp.path("update_weights_from_distributed"), payload,
                                          policy=self.control_policy))
        bad = [(r.url, r.error) for r in results if not r.ok]
        if bad:
            raise RolloutError(f"update_weights_from_distributed failed: {bad}")

    def post_destroy_weights_group(self, urls, group_name: str) -> None:
        hc.run_sync(hc.call_all("POST", urls, sp.path("destroy_weights_update_group"),
                                sp.DestroyWeightsUpdateGroupRequest(group_name=group_name).to_json(),
                                policy=hc.RetryPolicy(max_attempts=1, request_timeout_s=30)))

    def shutdown(self) -> None:
        if getattr(self, "_shut", False):
            return
        try:
            self.transport.close(self)
        except Exception:  # noqa: BLE001
            pass
        if self._router is not None:
            self._router.stop()
        super().shutdown()
