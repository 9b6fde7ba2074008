"""Every request and weight-update payload we send to SGLang, built in one typed place.

Written against SGLang **0.5.23** (PyPI wheel ``sglang-0.5.23-cp311``, read from the wheel's
source) and sglang-router **0.3.2**:

- ``python/sglang/srt/managers/io_struct.py``: ``GenerateReqInput``, ``Begin/EndWeightUpdateReqInput``,
  ``UpdateWeightsFromTensorReqInput``,
  ``InitWeightsUpdateGroupReqInput``, ``UpdateWeightsFromDistributedReqInput``,
  ``UpdateWeightFromDiskReqInput``, ``DestroyWeightsUpdateGroupReqInput``,
  ``ReleaseMemoryOccupationReqInput``, ``ResumeMemoryOccupationReqInput``,
  ``UpdateWeightVersionReqInput``, ``PauseGenerationReqInput``, ``ContinueGenerationReqInput``.
- ``python/sglang/api/v1/api_types.py`` (generated from SGLang's proto schema; ``/generate``
  bodies are checked against it and its ``SamplingParams`` *rejects unknown keys*).
- ``python/sglang/srt/entrypoints/http_server.py``: the routes below. There is no
  ``/get_weight_version`` in 0.5.23: the served weight version is ``/model_info``'s
  ``weight_version`` (and every ``/generate`` answer's ``meta_info.weight_version``).
- ``python/sglang/srt/weight_sync/tensor_bucket.py`` (``FlattenedTensorBucket``),
  ``srt/utils/common.py`` (``MultiprocessingSerializer``, ``SafeUnpickler.ALLOWED_GLOBALS``),
  ``srt/utils/patch_torch.py`` (CUDA IPC handles carry the device UUID),
  ``srt/model_executor/model_runner_components/weight_updater.py`` (how ``load_format=
  "flattened_bucket"`` payloads are read: ``meta.name/shape/dtype/start_idx/end_idx/numel``
  attributes, so a ``types.SimpleNamespace`` — allowed by SafeUnpickler — carries them and the
  trainer does not need SGLang installed).

The field lists these builders are checked against are committed in
``tests/data/sglang_0.5.23_api.json`` (written by ``tools/record_sglang_api.py`` from the wheel).
How slime drives the same endpoints: THUDM/slime ``slime/backends/sglang_utils/sglang_engine.py``
and ``slime/backends/megatron_utils/update_weight/`` (commit 624b824a, 2026-08-21).
"""

from __future__ import annotations

import base64
import io
import types
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from megatron_rlrt.rollout.base import RolloutError, RolloutSample, SamplingParams

SGLANG_VERSION = "0.5.23"
SGLANG_ROUTER_VERSION = "0.3.2"

# Endpoint paths (http_server.py, SGLang 0.5.23) and the struct each body must match.
ROUTES: dict[str, tuple[str, str, str | None]] = {
    # name: (method, path, io_struct / api_types class of the body)
    "generate": ("POST", "/generate", "GenerateReqInput"),
    "health": ("GET", "/health", None),
    "health_generate": ("GET", "/health_generate", None),
    "model_info": ("GET", "/model_info", None),
    "server_info": ("GET", "/server_info", None),
    "flush_cache": ("POST", "/flush_cache", None),
    "begin_weight_update": ("POST", "/begin_weight_update", "BeginWeightUpdateReqInput"),
    "end_weight_update": ("POST", "/end_weight_update", "EndWeightUpdateReqInput"),
    "update_weights_from_tensor": ("POST", "/update_weights_from_tensor", "UpdateWeightsFromTensorReqInput"),
    "init_weights_update_group": ("POST", "/init_weights_update_group", "InitWeightsUpdateGroupReqInput"),
    "destroy_weights_update_group": ("POST", "/destroy_weights_update_group", "DestroyWeightsUpdateGroupReqInput"),
    "update_weights_from_distributed": ("POST", "/update_weights_from_distributed",
                                        "UpdateWeightsFromDistributedReqInput"),
    "update_weights_from_disk": ("POST", "/update_weights_from_disk", "UpdateWeightFromDiskReqInput"),
    "update_weight_version": ("POST", "/update_weight_version", "UpdateWeightVersionReqInput"),
    "release_memory_occupation": ("POST", "/release_memory_occupation", "ReleaseMemoryOccupationReqInput"),
    "resume_memory_occupation": ("POST", "/resume_memory_occupation", "ResumeMemoryOccupationReqInput"),
    "pause_generation": ("POST", "/pause_generation", "PauseGenerationReqInput"),
    "continue_generation": ("POST", "/continue_generation", "ContinueGenerationReqInput"),
}

DEFAULT_GROUP_NAME = "megatron_rlrt"


def path(name: str) -> str:
    return ROUTES[name][1]


class _Payload:
    """A request body: ``to_json()`` drops fields left at ``None`` (SGLang's defaults apply)."""

    STRUCT: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# --- generation ----------------------------------------------------------------------------


def sampling_params_json(params: SamplingParams, n: int, seed: int | None = None) -> dict[str, Any]:
    """``GenerateReqInput.sampling_params`` (keys of api_types.SamplingParams, which rejects others)."""
    out: dict[str, Any] = {
        "max_new_tokens": int(params.max_new_tokens),
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": int(params.top_k) if params.top_k > 0 else -1,  # SGLang: -1 (or 1<<30) = no top-k
        "n": int(n),
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if params.stop_token_ids:
        out["stop_token_ids"] = [int(t) for t in params.stop_token_ids]
    if seed is not None:
        out["sampling_seed"] = int(seed)
    return out


@dataclass
class GenerateRequest(_Payload):
    """``POST /generate`` with token ids in, token ids and the sampler's log-probs out.

    One request carries one prompt and its ``n`` samples (``sampling_params.n``): SGLang expands
    it into ``n`` sequences sharing the prompt's KV cache and answers with a list of ``n``
    outputs (a single dict when ``n == 1``)."""

    STRUCT = "GenerateReqInput"
    input_ids: list[int]
    sampling_params: dict[str, Any]
    return_logprob: bool = True
    logprob_start_len: int = -1  # only output-token log-probs
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | None = None

    @classmethod
    def build(cls, input_ids: Sequence[int], params: SamplingParams, n: int, *, seed: int | None = None,
              rid: str | None = None) -> "GenerateRequest":
        if not input_ids:
            raise RolloutError("empty prompt: SGLang refuses input_ids=[]")
        return cls(input_ids=[int(t) for t in input_ids], sampling_params=sampling_params_json(params, n, seed),
                   rid=rid)


_FINISH = {"stop": "stop", "length": "length"}


def parse_generate_response(body: Any, n: int, prompt_index: int, url: str = "") -> list[RolloutSample]:
    """``n`` ``RolloutSample`` from a ``/generate`` answer, or raise ``ValueError`` (retryable)
    when the answer is incomplete, inconsistent or aborted by the server."""
    outputs = body if isinstance(body, list) else [body]
    if len(outputs) != n:
        raise ValueError(f"expected {n} outputs, got {len(outputs)}")
    samples = []
    for k, out in enumerate(outputs):
        if not isinstance(out, dict) or "meta_info" not in out:
            raise ValueError(f"output {k} has no meta_info: {str(out)[:200]}")
        meta = out["meta_info"]
        finish = meta.get("finish_reason") or {}
        kind = finish.get("type") if isinstance(finish, dict) else str(finish)
        if kind not in _FINISH:
            raise ValueError(f"output {k} finished with {finish!r} (aborted or unfinished)")
        ids = out.get("output_ids")
        entries = meta.get("output_token_logprobs")
        if ids is None or entries is None:
            raise ValueError(f"output {k} lacks output_ids / output_token_logprobs (return_logprob not honoured?)")
        # Each entry is [logprob, token_id, text-or-null] (api_types.LogprobEntry).
        lp_ids = [int(e[1]) for e in entries]
        if lp_ids != [int(t) for t in ids]:
            raise ValueError(f"output {k}: log-prob token ids differ from output_ids")
        logprobs = [float(e[0]) for e in entries]
        samples.append(RolloutSample(
            prompt_index=prompt_index, response_ids=[int(t) for t in ids], logprobs=logprobs,
            finish_reason=_FINISH[kind],
            meta={"engine": url, "weight_version": meta.get("weight_version"),
                  "prompt_tokens": meta.get("prompt_tokens"), "cached_tokens": meta.get("cached_tokens"),
                  "matched_stop": finish.get("matched") if isinstance(finish, dict) else None},
        ))
    return samples


# --- weight updates ------------------------------------------------------------------------


@dataclass
class BeginWeightUpdateRequest(_Payload):
    """SGLang 0.5.23 refuses ``update_weights_from_tensor`` / ``_from_distributed`` outside a
    session opened by ``/begin_weight_update`` and closed by ``/end_weight_update``
    (scheduler_components/weight_updater.py); ``update_weights_from_disk`` needs none."""

    STRUCT = "BeginWeightUpdateReqInput"
    selector: str = "all"  # "target" | "draft" | "all"


@dataclass
class EndWeightUpdateRequest(_Payload):
    STRUCT = "EndWeightUpdateReqInput"


@dataclass
class UpdateWeightsFromTensorRequest(_Payload):
    """Colocated: one serialized ``FlattenedTensorBucket`` per TP rank of the engine (CUDA IPC
    handles of the trainer's GPU buffers; base64 over HTTP). Each engine rank opens its own entry."""

    STRUCT = "UpdateWeightsFromTensorReqInput"
    serialized_named_tensors: list[str]
    load_format: str | None = "flattened_bucket"
    flush_cache: bool = False
    weight_version: str | None = None


@dataclass
class InitWeightsUpdateGroupRequest(_Payload):
    """Disaggregated: join the trainer's NCCL group. The trainer is rank 0; engine ``i``'s TP
    ranks are ``rank_offset .. rank_offset + tp - 1``; ``world_size = 1 + sum(engine GPUs)``."""

    STRUCT = "InitWeightsUpdateGroupReqInput"
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = DEFAULT_GROUP_NAME
    backend: str = "nccl"


@dataclass
class DestroyWeightsUpdateGroupRequest(_Payload):
    STRUCT = "DestroyWeightsUpdateGroupReqInput"
    group_name: str = DEFAULT_GROUP_NAME


@dataclass
class UpdateWeightsFromDistributedRequest(_Payload):
    """Disaggregated: the metadata of one bucket the trainer is about to broadcast from rank 0.
    With ``load_format="flattened_bucket"`` the engine receives ONE flat uint8 buffer (the
    tensors' bytes back to back in this order) in a single broadcast."""

    STRUCT = "UpdateWeightsFromDistributedReqInput"
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = DEFAULT_GROUP_NAME
    flush_cache: bool = False
    weight_version: str | None = None
    load_format: str | None = "flattened_bucket"

    @classmethod
    def for_bucket(cls, bucket: Sequence[tuple[str, torch.Tensor]], **kwargs) -> "UpdateWeightsFromDistributedRequest":
        return cls(names=[n for n, _ in bucket], dtypes=[dtype_name(t.dtype) for _, t in bucket],
                   shapes=[list(t.shape) for _, t in bucket], **kwargs)


@dataclass
class UpdateWeightFromDiskRequest(_Payload):
    """Fallback: reload from a HF checkpoint directory every engine can read."""

    STRUCT = "UpdateWeightFromDiskReqInput"
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    flush_cache: bool = True


@dataclass
class UpdateWeightVersionRequest(_Payload):
    STRUCT = "UpdateWeightVersionReqInput"
    new_version: str
    abort_all_requests: bool = False


@dataclass
class ReleaseMemoryOccupationRequest(_Payload):
    """Colocated: free weights and KV cache while the trainer runs (server needs
    ``--enable-memory-saver``). ``tags`` None = everything (``weights``, ``kv_cache``)."""

    STRUCT = "ReleaseMemoryOccupationReqInput"
    tags: list[str] | None = None


@dataclass
class ResumeMemoryOccupationRequest(_Payload):
    STRUCT = "ResumeMemoryOccupationReqInput"
    tags: list[str] | None = None


@dataclass
class PauseGenerationRequest(_Payload):
    STRUCT = "PauseGenerationReqInput"
    mode: str = "abort"  # "abort" | "retract" | "in_place"


@dataclass
class ContinueGenerationRequest(_Payload):
    STRUCT = "ContinueGenerationReqInput"


# --- tensors on the wire ---------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (SGLang does ``getattr(torch, name)``)."""
    return str(dtype).replace("torch.", "")


def flatten_bucket(bucket: Sequence[tuple[str, torch.Tensor]], align: int = 1
                   ) -> tuple[torch.Tensor, list[types.SimpleNamespace]]:
    """The tensors' bytes in one uint8 tensor, and SGLang's FlattenedTensorMetadata fields for
    each (``name, shape, dtype, start_idx, end_idx, numel``; byte offsets).

    ``align=1``: back to back, the layout ``FlattenedTensorBucket.empty`` rebuilds on the
    receiving side of a broadcast (so a broadcast bucket must hold one dtype, see
    ``split_by_dtype``). ``align>1`` (IPC payloads, which carry their offsets): every tensor
    starts at a multiple of ``align`` bytes so ``.view(dtype)`` works for mixed dtypes.
    """
    if not bucket:
        raise ValueError("cannot flatten an empty bucket")
    flats, metadata, offset = [], [], 0
    device = bucket[0][1].device
    for name, tensor in bucket:
        flat = tensor.detach().contiguous().flatten().view(torch.uint8)
        pad = (-offset) % align
        if pad:
            flats.append(torch.zeros(pad, dtype=torch.uint8, device=device))
            offset += pad
        if offset % tensor.element_size():
            raise ValueError(f"{name}: byte offset {offset} not aligned for {tensor.dtype}; split the bucket by dtype")
        metadata.append(types.SimpleNamespace(name=name, shape=torch.Size(tensor.shape), dtype=tensor.dtype,
                                              start_idx=offset, end_idx=offset + flat.numel(), numel=flat.numel()))
        flats.append(flat.to(device))
        offset += flat.numel()
    return torch.cat(flats), metadata


def split_by_dtype(bucket: Sequence[tuple[str, torch.Tensor]]) -> list[list[tuple[str, torch.Tensor]]]:
    """One sub-bucket per dtype, order kept within each."""
    groups: dict[torch.dtype, list] = {}
    for name, tensor in bucket:
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    return list(groups.values())


def unflatten_bucket(flat: torch.Tensor, metadata: Sequence[Any]) -> list[tuple[str, torch.Tensor]]:
    """Inverse of ``flatten_bucket`` (what SGLang's FlattenedTensorBucket.reconstruct_tensors does)."""
    return [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in metadata]


def _uuid_cuda_reducer():
    """ForkingPickler reducer for CUDA tensors that names the device by UUID, like SGLang's
    ``monkey_patch_torch_reductions`` (the engine's ranks may number GPUs differently)."""
    from torch.multiprocessing import reductions

    def reduce(tensor: torch.Tensor):
        fn, args = reductions.reduce_tensor(tensor)
        if tensor.is_cuda:
            index = 6  # the device argument of rebuild_cuda_tensor (patch_torch._REDUCE_TENSOR_ARG_DEVICE_INDEX)
            args = (*args[:index], str(torch.cuda.get_device_properties(args[index]).uuid), *args[index + 1:])
        return fn, args

    return reduce


def serialize_flattened_bucket(flat: torch.Tensor, metadata: Sequence[Any]) -> str:
    """``MultiprocessingSerializer.serialize({"flattened_tensor", "metadata"}, output_str=True)``:
    ForkingPickler (CUDA tensors travel as IPC handles, not bytes) + base64."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions with ForkingPickler

    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    if flat.is_cuda:
        pickler.dispatch_table[torch.Tensor] = _uuid_cuda_reducer()
        pickler.dump({"flattened_tensor": flat, "metadata": list(metadata)})
    else:
        # CPU (tests, CPU servers): the storage moves to shared memory and travels as a file name
        # any process of this machine can map; torch's default ``file_descriptor`` strategy would
        # need a socket between parent and child to pass the descriptor.
        with _sharing_strategy("file_system"):
            pickler.dump({"flattened_tensor": flat, "metadata": list(metadata)})
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _sharing_strategy:
    """Set torch's CPU tensor sharing strategy for the duration of a ``with`` block."""

    def __init__(self, strategy: str):
        self.strategy = strategy

    def __enter__(self):
        import torch.multiprocessing as mp

        self.saved = mp.get_sharing_strategy()
        mp.set_sharing_strategy(self.strategy)

    def __exit__(self, *exc):
        import torch.multiprocessing as mp

        mp.set_sharing_strategy(self.saved)


# --- server flags ------------------------------------------------------------------------------


def server_args(*, model_path: str, host: str, port: int, tp_size: int = 1, base_gpu_id: int = 0,
                nccl_port: int | None = None, mem_fraction_static: float | None = None,
                enable_memory_saver: bool = False, dtype: str | None = None, weight_version: str | None = None,
                random_seed: int | None = None, skip_tokenizer_init: bool = True,
                nnodes: int = 1, node_rank: int = 0, dist_init_addr: str | None = None,
                quantization: str | None = None) -> list[str]:
    """``sglang.launch_server`` flags (ServerArgs fields, ``--field-name`` spelling)."""
    args = ["--model-path", model_path, "--host", host, "--port", str(port), "--tp-size", str(tp_size),
            "--base-gpu-id", str(base_gpu_id)]
    if nccl_port is not None:
        args += ["--nccl-port", str(nccl_port)]
    if mem_fraction_static is not None:
        args += ["--mem-fraction-static", str(mem_fraction_static)]
    if enable_memory_saver:
        args += ["--enable-memory-saver"]
    if dtype:
        args += ["--dtype", dtype]
    if quantization:  # "fp8": W8A8 FP8 linear layers (a blockwise-FP8 checkpoint: see rollout/fp8_weights.py)
        args += ["--quantization", quantization]
    if weight_version is not None:
        args += ["--weight-version", str(weight_version)]
    if random_seed is not None:
        args += ["--random-seed", str(random_seed)]
    if skip_tokenizer_init:
        args += ["--skip-tokenizer-init"]  # token ids in/out; the trainer owns the tokenizer
    if nnodes > 1:
        args += ["--nnodes", str(nnodes), "--node-rank", str(node_rank)]
        if dist_init_addr:
            args += ["--dist-init-addr", dist_init_addr]
    return args

