"""SGLang rollout engine (the cluster default): SGLang servers over HTTP, many engines, weight sync.

Written against SGLang 0.5.23 and sglang-router 0.3.2 (see ``sglang_protocol`` for the files
read). Every body sent is built in ``sglang_protocol``.

Placement
- colocated (``colocate=True``): one server per ``rollout_num_gpus_per_engine`` training GPUs of
  this node, launched with ``--enable-memory-saver``; ``release_memory()`` frees weights and
  KV cache while the trainer runs, ``resume_memory()`` takes them back.
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
on CUDA, else "disk"), after which the cache is flushed and every engine must report the new
version (``/model_info``):
- "tensor": ``/begin_weight_update``, then per bucket (``update_weight_buffer_size`` bytes) one
  ``/update_weights_from_tensor`` with a ``flattened_bucket`` payload whose tensor travels as a
  CUDA IPC handle (one entry per engine TP rank), then ``/end_weight_update``. The sending
  process must be on the engines' node.
- "distributed": once, ``/init_weights_update_group`` on every engine while the trainer joins
  the same group as rank 0 (``world_size = 1 + all engine GPUs``, NCCL); then per update
  ``/begin_weight_update``, per bucket (one dtype) ``/update_weights_from_distributed`` +
  one broadcast of the flattened bucket, ``/end_weight_update``.
- "disk": a HF safetensors snapshot in ``weight_sync_dir`` (shared storage for multi-node),
  then ``/update_weights_from_disk``.

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
import threading
import time
from datetime import timedelta
from typing import Iterable, Sequence

import aiohttp
import torch

from megatron_rlrt.rollout import http_client as hc
from megatron_rlrt.rollout import sglang_protocol as sp
from megatron_rlrt.rollout.base import RolloutError, RolloutSample
from megatron_rlrt.rollout.launch import EnginePlacement, ServerProcess, find_free_port, sglang_router_command
from megatron_rlrt.rollout.server_engine import DEFAULT_BUCKET_BYTES, ServerEngineBase, parse_urls


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


def _this_host_address() -> str:
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
        if weight_sync not in ("auto", "tensor", "distributed", "disk"):
            raise ValueError(f"weight_sync must be auto|tensor|distributed|disk, not {weight_sync!r}")
        if logprobs not in ("processed", "raw"):
            raise ValueError("logprobs must be 'processed' or 'raw'")
        if weight_sync == "auto":
            weight_sync = "tensor" if colocate else ("distributed" if torch.cuda.is_available() else "disk")
        self.weight_sync = weight_sync
        self.mem_fraction_static, self.dtype, self.logprobs = mem_fraction_static, dtype, logprobs
        self.extra_server_args, self.server_env = list(extra_server_args), dict(server_env or {})
        self.master_address = master_address
        self.sender_id = int(sender_id)
        self.group_backend = group_backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.group_name = f"{sp.DEFAULT_GROUP_NAME}_sender{self.sender_id}"
        self._group = None
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
            seed=self.seed, extra_args=self.extra_server_args)
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

    def release_memory(self) -> None:
        """Colocated: flush, then free weights + KV cache (``/release_memory_occupation``)."""
        self._check_open()
        if not self.colocate:
            return
        self.flush_cache()
        self._control("POST", sp.path("release_memory_occupation"), sp.ReleaseMemoryOccupationRequest().to_json(),
                      what="release_memory_occupation")

    def resume_memory(self) -> None:
        self._check_open()
        if self.colocate:
            self._control("POST", sp.path("resume_memory_occupation"), sp.ResumeMemoryOccupationRequest().to_json(),
                          what="resume_memory_occupation")

    # --- weights ------------------------------------------------------------------------

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """All of a weight update from this process: begin, send every bucket, finish (flush + check)."""
        self._check_open()
        t0 = time.perf_counter()
        if self.weight_sync == "disk":
            self._update_from_disk(buckets, version)
        else:
            self.begin_update(version)
            try:
                self.send_buckets(buckets, version)
            except BaseException:
                self._close_session()  # leave no session open: the next update must be able to begin
                raise
            self.finish_update(version)
        self.metrics["perf/weight_sync_s"] = time.perf_counter() - t0

    def begin_update(self, version: int) -> None:
        """Open SGLang's weight-update session on every live engine (tensor / distributed)."""
        self._check_open()
        if self.weight_sync == "distributed":
            self.connect_weights_group()
        self._control("POST", sp.path("begin_weight_update"), sp.BeginWeightUpdateRequest().to_json(),
                      what="begin_weight_update", tolerate=self.weight_sync != "distributed")

    def send_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """Send this process's HF-named tensors (tensor / distributed), bucket by bucket."""
        self._check_open()
        for bucket in buckets:
            if not bucket:
                continue
            if self.weight_sync == "tensor":
                self._send_tensor_bucket(bucket, version)
            elif self.weight_sync == "distributed":
                for part in sp.split_by_dtype(bucket):
                    self._send_distributed_bucket(part, version)
            else:
                raise RolloutError(f"send_buckets does not apply to weight_sync={self.weight_sync!r}")

    def _close_session(self) -> None:
        try:
            hc.run_sync(hc.call_all("POST", self.live_urls(), sp.path("end_weight_update"),
                                    sp.EndWeightUpdateRequest().to_json(),
                                    policy=hc.RetryPolicy(max_attempts=1, request_timeout_s=60)))
        except Exception:  # noqa: BLE001 - best effort; the original error is what matters
            pass

    def finish_update(self, version: int) -> None:
        """Close the session, flush caches, set and check the weight version everywhere."""
        self._control("POST", sp.path("end_weight_update"), sp.EndWeightUpdateRequest().to_json(),
                      what="end_weight_update", tolerate=self.weight_sync != "distributed")
        self._set_and_check_version(version)

    def _set_and_check_version(self, version: int) -> None:
        # The version is also sent with every bucket; setting it once more covers engines that
        # received no bucket from this sender (PP) and answers the question explicitly.
        self._control("POST", sp.path("update_weight_version"),
                      sp.UpdateWeightVersionRequest(new_version=str(version)).to_json(), what="update_weight_version")
        self.flush_cache()
        self._check_versions(version, self.served_weight_versions())
        self.weight_version = int(version)
        self._version_known = True

    def _update_from_disk(self, buckets, version: int) -> None:
        t0 = time.perf_counter()
        snapshot = self._write_snapshot(buckets, version)
        self.metrics["perf/weight_write_s"] = time.perf_counter() - t0
        payload = sp.UpdateWeightFromDiskRequest(model_path=snapshot, weight_version=str(version)).to_json()
        self._control("POST", sp.path("update_weights_from_disk"), payload, what="update_weights_from_disk")
        self.flush_cache()
        self._check_versions(version, self.served_weight_versions())
        self.weight_version = int(version)
        self._version_known = True
        self._drop_old_snapshots(keep=snapshot)

    def _send_tensor_bucket(self, bucket, version: int) -> None:
        if not all(t.is_cuda for _, t in bucket):
            raise RolloutError("weight_sync='tensor' (CUDA IPC) needs CUDA tensors; use 'disk' or 'distributed'")
        flat, metadata = sp.flatten_bucket(bucket, align=16)
        serialized = sp.serialize_flattened_bucket(flat, metadata)
        urls = self.live_urls()
        payloads = [sp.UpdateWeightsFromTensorRequest(serialized_named_tensors=[serialized] * self.engine_tp_size(u),
                                                      weight_version=str(version)).to_json() for u in urls]
        torch.cuda.synchronize()
        self._control("POST", sp.path("update_weights_from_tensor"), urls=urls, payloads=payloads,
                      what="update_weights_from_tensor")
        del flat, serialized
        torch.cuda.ipc_collect()  # release IPC blocks the engines have closed

    def connect_weights_group(self) -> None:
        """Create the NCCL group trainer(rank 0) + every engine GPU, once (distributed sync)."""
        if self._group is not None:
            return
        urls = self.live_urls()
        tps = [self.engine_tp_size(u) for u in urls]
        world = 1 + sum(tps)
        address = self.master_address or _this_host_address()
        port = find_free_port(40000 + 100 * self.sender_id, "0.0.0.0" if address != "127.0.0.1" else "127.0.0.1")
        offsets = [1 + sum(tps[:i]) for i in range(len(urls))]
        payloads = [sp.InitWeightsUpdateGroupRequest(
            master_address=address, master_port=port, rank_offset=off, world_size=world, group_name=self.group_name,
            backend=self.group_backend).to_json() for off in offsets]
        box: dict = {}

        def post() -> None:  # the engines block in this call until the trainer joins
            try:
                box["results"] = hc.run_sync(hc.call_all("POST", urls, sp.path("init_weights_update_group"),
                                                         payloads=payloads, policy=self.control_policy))
            except BaseException as exc:  # noqa: BLE001
                box["error"] = exc

        thread = threading.Thread(target=post, daemon=True)
        thread.start()
        try:
            group = init_weights_update_group(address, port, 0, world, self.group_name, self.group_backend,
                                              timeout_s=self.control_policy.request_timeout_s)
        finally:
            thread.join()
        if "error" in box:
            raise RolloutError(f"init_weights_update_group failed: {box['error']}")
        bad = [r for r in box["results"] if not r.ok]
        if bad:
            raise RolloutError(f"init_weights_update_group failed on {[(r.url, r.error) for r in bad]}")
        self._group = group
        self._group_urls = urls

    def _send_distributed_bucket(self, bucket, version: int) -> None:
        import torch.distributed as dist

        urls = self._group_urls
        payload = sp.UpdateWeightsFromDistributedRequest.for_bucket(
            bucket, group_name=self.group_name, weight_version=str(version)).to_json()
        flat, _ = sp.flatten_bucket(bucket, align=1)
        if self.group_backend == "nccl" and not flat.is_cuda:
            flat = flat.cuda()
        box: dict = {}

        def post() -> None:
            try:
                box["results"] = hc.run_sync(hc.call_all("POST", urls, sp.path("update_weights_from_distributed"),
                                                         payload, policy=self.control_policy))
            except BaseException as exc:  # noqa: BLE001
                box["error"] = exc

        thread = threading.Thread(target=post, daemon=True)
        thread.start()
        try:
            dist.broadcast(flat, src=0, group=self._group)
        finally:
            thread.join()
        bad = box.get("error") or [(r.url, r.error) for r in box.get("results", []) if not r.ok]
        if bad:
            raise RolloutError(f"update_weights_from_distributed failed: {bad}")

    def disconnect_weights_group(self) -> None:
        if self._group is None:
            return
        import torch.distributed as dist

        try:
            hc.run_sync(hc.call_all("POST", self._group_urls, sp.path("destroy_weights_update_group"),
                                    sp.DestroyWeightsUpdateGroupRequest(group_name=self.group_name).to_json(),
                                    policy=hc.RetryPolicy(max_attempts=1, request_timeout_s=30)))
        finally:
            try:
                dist.destroy_process_group(self._group)
            except Exception:  # noqa: BLE001
                pass
            self._group = None

    def shutdown(self) -> None:
        if getattr(self, "_shut", False):
            return
        try:
            self.disconnect_weights_group()
        except Exception:  # noqa: BLE001
            pass
        if self._router is not None:
            self._router.stop()
        super().shutdown()
