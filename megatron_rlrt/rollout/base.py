"""The rollout engine protocol: what the trainer needs from anything that samples responses.

Engines: ``hf`` (embedded default, in-process transformers generation, CPU or one GPU),
``sglang`` (cluster default, HTTP servers), ``vllm`` (OpenAI-compatible server). Each is
chosen by name from ``megatron_rlrt.rollout.registry``.

Weights move trainer -> engine as Hugging Face-named full tensors produced by the one
mapping in ``megatron_rlrt.models.mapping`` (gathered across TP, per pipeline stage), in
buckets of bounded size (``iter_weight_buckets``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

import torch


# SGLang's memory-saver regions (sglang.srt.constants.GPU_MEMORY_TYPE_WEIGHTS / _KV_CACHE)
WEIGHTS, KV_CACHE = "weights", "kv_cache"
MEMORY_TAGS = (WEIGHTS, KV_CACHE)


class RolloutError(RuntimeError):
    """The engine could not produce a complete rollout; the training step must not proceed."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling for one generate call (SGLang / vLLM field meanings)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclass
class RolloutSample:
    """One sampled response: token ids and the sampler's log-prob of each (for TIS)."""

    prompt_index: int
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS / stop token) | "length" (hit max_new_tokens) | engine-specific
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.response_ids) != len(self.logprobs):
            raise RolloutError(
                f"prompt {self.prompt_index}: {len(self.response_ids)} response tokens but {len(self.logprobs)} log-probs"
            )


@runtime_checkable
class RolloutEngine(Protocol):
    """What every engine implements. Methods are called on the trainer's rank 0 unless an
    engine documents otherwise (e.g. NCCL weight broadcast from each pipeline stage owner)."""

    weight_version: int

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams) -> list[list[RolloutSample]]:
        """``n`` samples for each prompt, as ``result[prompt_index][k]``. Every prompt comes
        back complete or the call raises ``RolloutError``; nothing is dropped silently."""

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """Load HF-named full tensors (in buckets) and mark the engine as serving ``version``."""

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Free accelerator memory while the trainer runs (colocated placement); ``tags`` a subset
        of ``MEMORY_TAGS`` (None = all), as SGLang's memory saver names its regions."""

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take the memory back before the next update / generate: weights first, the KV cache
        after the weight update (slime's order: the KV cache is allocated last, unfragmented)."""

    def health(self) -> dict:
        """A small status dict; raises RolloutError when the engine is unusable."""

    def shutdown(self) -> None:
        """Stop servers / free resources. Idempotent."""


def iter_weight_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = 512 * 1024**2
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into lists of at most ``bucket_bytes`` (one tensor may exceed it)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
