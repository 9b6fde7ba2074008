"""What the HTTP server engines (SGLang, vLLM) share: placement, launch/connect, generation
dispatch with fault handling, weight-update bookkeeping, disk snapshots, metrics, shutdown.

Placement (``--colocate``, ``--rollout-num-gpus-per-engine``, ``--rollout-urls``):

- ``rollout_urls`` given: connect to running servers (or one router) and launch nothing.
- otherwise launch ``rollout_num_gpus // rollout_num_gpus_per_engine`` servers on this node
  (GPUs ``rollout_first_gpu ..``), each with TP = ``rollout_num_gpus_per_engine``.
  ``colocate=True``: the servers share the training GPUs and release their memory while the
  trainer runs (``release_memory`` / ``resume_memory``).

Fault rules (on top of ``http_client``'s per-request rules):

- Generation: a dead engine's requests go to live engines; ``RolloutError`` when none is left.
- Weight update: an engine that fails any step of an update, or afterwards reports another
  weight version, is marked dead (it would serve stale or half-loaded weights) and gets no more
  requests. The update succeeds if at least ``min_live_engines`` engines serve the new version,
  else ``RolloutError`` (the step fails; ``weight_version`` keeps the old value).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any, Iterable, Sequence

import torch

from megatron_rlrt.rollout import http_client as hc
from megatron_rlrt.rollout.base import RolloutError, RolloutSample, SamplingParams
from megatron_rlrt.rollout.launch import EnginePlacement, ServerProcess, plan_engines

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 * 1024**2


def parse_urls(urls: str | Sequence[str] | None) -> list[str]:
    """``--rollout-urls`` as given on the command line: comma/space separated, or a list."""
    if urls is None:
        return []
    if isinstance(urls, str):
        urls = urls.replace(",", " ").split()
    out = []
    for url in urls:
        url = url.strip().rstrip("/")
        if url and not url.startswith(("http://", "https://")):
            url = "http://" + url
        if url:
            out.append(url)
    return out


class ServerEngineBase:
    """Base of ``SGLangEngine`` and ``VLLMEngine``; see the module docstring."""

    name = "server"
    health_path = "/health"

    def __init__(
        self,
        *,
        model_path: str | None = None,
        rollout_urls: str | Sequence[str] | None = None,
        colocate: bool = False,
        rollout_num_gpus: int | None = None,
        rollout_num_gpus_per_engine: int = 1,
        rollout_first_gpu: int = 0,
        update_weight_buffer_size: int = DEFAULT_BUCKET_BYTES,
        host: str = "127.0.0.1",
        base_port: int = 30000,
        python: str | None = None,
        log_dir: str | None = None,
        weight_sync_dir: str | None = None,
        max_inflight_per_engine: int = 256,
        request_timeout_s: float = 1800.0,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        control_timeout_s: float = 600.0,
        startup_timeout_s: float = 1800.0,
        min_live_engines: int = 1,
        progress: bool = True,
        seed: int | None = None,
        initial_weight_version: int = 0,
        quantization: str | None = None,
    ):
        if quantization not in (None, "fp8"):
            raise ValueError(f"quantization {quantization!r}: only 'fp8' (blockwise FP8 rollouts) is supported")
        self.quantization = quantization
        self.model_path = model_path
        self.colocate = bool(colocate)
        self.num_gpus_per_engine = int(rollout_num_gpus_per_engine)
        self.update_weight_buffer_size = int(update_weight_buffer_size)
        self.progress = progress
        self.seed = seed
        self.min_live_engines = int(min_live_engines)
        self.policy = hc.RetryPolicy(max_attempts=max_attempts, backoff_s=backoff_s,
                                     request_timeout_s=request_timeout_s)
        self.control_policy = hc.RetryPolicy(max_attempts=3, backoff_s=backoff_s, request_timeout_s=control_timeout_s)
        self.max_inflight_per_engine = int(max_inflight_per_engine)
        self.startup_timeout_s = float(startup_timeout_s)
        self.python = python
        self.weight_version = int(initial_weight_version)
        self.servers: list[ServerProcess] = []
        self.placements: list[EnginePlacement] = []
        self.metrics: dict[str, float] = {}
        self._shut = False
        self._own_tmp: str | None = None
        self.log_dir = log_dir or self._tmpdir("logs")
        self.weight_sync_dir = weight_sync_dir

        urls = parse_urls(rollout_urls)
        if urls:
            self.launched = False
        else:
            if not model_path:
                raise ValueError(f"{self.name}: give rollout_urls (running servers) or model_path (to launch)")
            n_gpus = rollout_num_gpus if rollout_num_gpus is not None else self._default_num_gpus()
            self.placements = plan_engines(n_gpus, self.num_gpus_per_engine, first_gpu=rollout_first_gpu,
                                           host=host, base_port=base_port)
            urls = [p.url for p in self.placements]
            self.launched = True
        self.urls = urls
        self.pool = hc.EndpointPool(urls, health_path=self.health_path, policy=self.policy)
        self.gen_pool = self.pool  # where /generate goes (a router's pool when one is used)
        if self.launched:
            try:
                self._launch()
            except BaseException:
                self.shutdown()
                raise

    # --- subclass hooks ------------------------------------------------------------------

    def _server_command(self, placement: EnginePlacement) -> tuple[list[str], dict]:
        raise NotImplementedError

    async def _send_generate(self, session, endpoint: hc.Endpoint, job) -> list[RolloutSample]:
        raise NotImplementedError

    def _outgoing(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> Iterable[list[tuple[str, torch.Tensor]]]:
        """Weight-update buckets as the servers hold the weights: blockwise FP8 with
        ``quantization="fp8"`` (``rollout/fp8_weights.py``), unchanged otherwise."""
        if self.quantization != "fp8":
            return buckets
        from megatron_rlrt.rollout.fp8_weights import quantize_buckets

        return quantize_buckets(buckets)

    def _default_num_gpus(self) -> int:
        return torch.cuda.device_count() if torch.cuda.is_available() else self.num_gpus_per_engine

    # --- launch / connect ---------------------------------------------------------------

    def _tmpdir(self, what: str) -> str:
        if self._own_tmp is None:
            self._own_tmp = tempfile.mkdtemp(prefix=f"megatron_rlrt_{self.name}_")
        path = os.path.join(self._own_tmp, what)
        os.makedirs(path, exist_ok=True)
        return path

    def _launch(self) -> None:
        for placement in self.placements:
            cmd, env = self._server_command(placement)
            log = os.path.join(self.log_dir, f"{self.name}_{placement.index}.log")
            logger.info("starting %s engine %d on GPUs %s: %s", self.name, placement.index, placement.gpu_ids,
                        " ".join(cmd))
            self.servers.append(ServerProcess(f"{self.name} engine {placement.index}", cmd, env, log).start())
        for placement, server in zip(self.placements, self.servers):
            server.wait_healthy(placement.url, path=self.health_path, timeout_s=self.startup_timeout_s)

    # --- generation ---------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams) -> list[list[RolloutSample]]:
        """``n`` samples per prompt (``result[i][k]``), all or ``RolloutError``."""
        if n < 1:
            raise ValueError("n must be >= 1")
        self._check_open()
        jobs = [(i, list(p)) for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        results = hc.run_sync(hc.dispatch(
            self.gen_pool, jobs, lambda session, ep, job: self._send_generate(session, ep, (job, n, params)),
            max_inflight=self.max_inflight_per_engine * max(1, len(self.pool.live())), policy=self.policy,
            progress=self.progress, desc=f"{self.name} rollout",
        ))
        seconds = time.perf_counter() - t0
        tokens = sum(len(s.response_ids) for group in results for s in group)
        for i, group in enumerate(results):
            if group is None or len(group) != n or any(s.prompt_index != i for s in group):
                raise RolloutError(f"{self.name}: prompt {i} came back incomplete")
        self.metrics.update({"perf/rollout_s": seconds, "rollout/response_tokens": float(tokens),
                             "perf/rollout_tokens_per_s": tokens / max(seconds, 1e-9),
                             "rollout/live_engines": float(len(self.gen_pool.live()))})
        return results

    def _sample_seed(self, prompt_index: int, n: int, params: SamplingParams) -> int | None:
        """Seed of prompt ``prompt_index``'s first sample: ``(params.seed or the engine's seed) +
        prompt_index * n``, so that sample ``k`` (seed + k) never shares a stream with another
        prompt's sample. None (the default) = the server's own randomness. The trainer should
        vary ``SamplingParams.seed`` per step, or every step repeats the same random streams."""
        base = params.seed if params.seed is not None else self.seed
        return None if base is None else int(base) + prompt_index * n

    # --- control plane ------------------------------------------------------------------

    def live_urls(self) -> list[str]:
        return [e.url for e in self.pool.live()]

    def _endpoint(self, url: str) -> hc.Endpoint:
        return next(e for e in self.pool.endpoints if e.url == url)

    def _control(self, method: str, path: str, payload: dict | None = None, *, urls: Sequence[str] | None = None,
                 params: dict | None = None, payloads: Sequence[dict] | None = None, what: str = "",
                 tolerate: bool = True) -> list[hc.CallResult]:
        """One control request to each live engine. Engines that fail are marked dead
        (``tolerate``) or the call raises. Raises when fewer than ``min_live_engines`` remain."""
        urls = list(urls) if urls is not None else self.live_urls()
        if not urls:
            raise RolloutError(self.pool.all_dead_message())
        results = hc.run_sync(hc.call_all(method, urls, path, payload, policy=self.control_policy, params=params,
                                          payloads=payloads))
        failed = [r for r in results if not r.ok]
        for r in failed:
            message = f"{what or path} failed: {r.error}"
            if not tolerate:
                raise RolloutError(f"{self.name} engine {r.url}: {message}")
            self.pool.mark_dead(self._endpoint(r.url), message)
        self._require_live(what or path)
        return [r for r in results if r.ok]

    def _require_live(self, what: str) -> None:
        live = len(self.pool.live())
        if live < max(1, self.min_live_engines):
            raise RolloutError(f"{self.name}: {what}: only {live} live engine(s) left (need "
                               f"{max(1, self.min_live_engines)}); {self.pool.all_dead_message()}")

    def _check_open(self) -> None:
        if self._shut:
            raise RolloutError(f"{self.name} engine was shut down")

    def health(self) -> dict:
        """Probe every engine still considered alive; engines that do not answer are marked dead."""
        self._check_open()

        async def probe_all():
            import aiohttp

            async with aiohttp.ClientSession() as session:
                return await __import__("asyncio").gather(*[self.pool.probe(session, e) for e in self.pool.live()])

        for endpoint, ok in zip(list(self.pool.live()), hc.run_sync(probe_all())):
            if not ok:
                self.pool.mark_dead(endpoint, "health probe failed")
        self._require_live("health")
        return {"engine": self.name, "weight_version": self.weight_version, "live_engines": len(self.pool.live()),
                "engines": [{"url": e.url, "alive": e.alive, "completed": e.completed, "failures": e.failures,
                             "error": e.last_error} for e in self.pool.endpoints],
                "launched": self.launched}

    # --- weights ------------------------------------------------------------------------

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """All of a weight update from this process: ``_send_weights`` moves the (possibly FP8)
        buckets into every live server; timed as ``perf/weight_sync_s``."""
        self._check_open()
        t0 = time.perf_counter()
        self._send_weights(self._outgoing(buckets), version)
        self.metrics["perf/weight_sync_s"] = time.perf_counter() - t0

    def _send_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """How the tensors travel; the default (and every engine's disk path) is a snapshot."""
        self.update_from_snapshot(buckets, version)

    def update_from_snapshot(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """The disk update every server engine shares: write the tensors as a HF checkpoint
        directory (``weight_transport.write_hf_snapshot``; ``weight_sync_dir`` must be storage every
        server can read), make every live server load it (``_load_snapshot``), publish the version
        (``_publish_version``: caches dropped, every engine must report it), then remove the
        older snapshots."""
        from megatron_rlrt.rollout.weight_transport import drop_old_snapshots, write_hf_snapshot

        t0 = time.perf_counter()
        snapshot = write_hf_snapshot(buckets, version, self.weight_sync_dir or self._tmpdir("weights"),
                                     self.model_path)
        self.metrics["perf/weight_write_s"] = time.perf_counter() - t0
        self._load_snapshot(snapshot, version)
        self._publish_version(version)
        drop_old_snapshots(keep=snapshot)

    def _load_snapshot(self, snapshot: str, version: int) -> None:
        """The server's reload-from-directory request, on every live engine."""
        raise NotImplementedError

    def _publish_version(self, version: int) -> None:
        """After new weights are loaded: set ``version`` on the servers, drop caches computed with
        the old weights, check every engine reports ``version`` and ``note_version`` it."""
        raise NotImplementedError

    def note_version(self, version: int) -> None:
        """The servers were updated to ``version`` (by another process, e.g. each node's sender)."""
        self.weight_version = int(version)

    def _check_versions(self, version: int, reported: dict[str, Any]) -> None:
        """Mark engines that report another version than ``version`` dead, then require enough live."""
        for url, got in reported.items():
            if str(got) != str(version):
                self.pool.mark_dead(self._endpoint(url), f"serves weight version {got!r} after update to {version}")
        self._require_live(f"weight update to version {version}")

    # --- shutdown -----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the servers this engine launched (connected servers are left running). Idempotent."""
        if self._shut:
            return
        self._shut = True
        for server in self.servers:
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                logger.warning("stopping %s failed: %s", server.name, exc)
        if self._own_tmp and self.weight_sync_dir is None:
            shutil.rmtree(os.path.join(self._own_tmp, "weights"), ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __del__(self):
        try:
            if not self._shut and self.servers:
                self.shutdown()
        except Exception:  # noqa: BLE001
            pass
