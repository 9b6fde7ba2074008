"""What the analysis tools accept as a checkpoint: a Hugging Face directory (config.json +
safetensors) or a megatron-rlrt checkpoint (a model checkpoint, a run's ``checkpoints/`` dir or
a run dir whose ``latest`` names one; saved at any TP/PP -- dist checkpoints reshard on load).

Generation runs in a rollout engine that reads Hugging Face weights, so a megatron checkpoint is
exported once (``convert.megatron_to_hf``, cached under the tool's output directory). Scoring runs
the megatron model at the tool's TP/PP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_rlrt.models.qwen3 import CheckpointError, Qwen3Spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CheckpointRef:
    path: str  # as given
    kind: str  # "hf" | "megatron"
    resolved: str  # the HF dir, or the megatron model checkpoint dir
    label: str

    @property
    def tokenizer_dir(self) -> str:
        from megatron_rlrt.models.megatron_checkpoint import HF_DIR

        return self.resolved if self.kind == "hf" else os.path.join(self.resolved, HF_DIR)

    def spec(self) -> Qwen3Spec:
        if self.kind == "hf":
            return Qwen3Spec.from_hf_dir(self.resolved)
        from megatron_rlrt.models.megatron_checkpoint import spec_of_checkpoint

        return spec_of_checkpoint(self.resolved)


def resolve(path: str, label: str | None = None) -> CheckpointRef:
    """Classify ``path``; CheckpointError naming it when it is neither kind."""
    from megatron_rlrt.convert import resolve_checkpoint_dir

    if not os.path.exists(path):
        raise CheckpointError(f"{path}: does not exist (expected a Hugging Face directory or a megatron-rlrt checkpoint)")
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "metadata.json")):
        Qwen3Spec.from_hf_dir(path)  # validates config.json with a clear error
        return CheckpointRef(path, "hf", path, label or _default_label(path))
    try:
        ckpt = resolve_checkpoint_dir(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: neither a Hugging Face directory (no config.json) nor a megatron-rlrt "
                              f"checkpoint ({exc})") from None
    return CheckpointRef(path, "megatron", ckpt, label or _default_label(path))


def _default_label(path: str) -> str:
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return "/".join(parts[-2:]) if parts[-1].startswith("iter_") else parts[-1]


def hf_dir_for_generation(ref: CheckpointRef, cache_root: str) -> str:
    """The HF directory a rollout engine loads: the checkpoint itself, or its export (made once,
    in its own process, and reused on later runs)."""
    if ref.kind == "hf":
        return ref.resolved
    from megatron_rlrt.convert import megatron_to_hf

    safe = ref.label.replace("/", "_").replace(os.sep, "_")
    out = os.path.join(cache_root, "hf_export", safe)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    megatron_to_hf(ref.resolved, out, dtype="float32")
    return out


def load_chunks(ref: CheckpointRef, tp: int, pp: int, dtype: str = "float32"):
    """Model chunks of this rank with ``ref``'s weights (call inside initialised ranks)."""
    from megatron_rlrt.models.qwen3 import build_model, transformer_config

    spec = ref.spec()
    config = transformer_config(spec, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                params_dtype=DTYPES[dtype], perform_initialization=False)
    chunks = build_model(spec, config)
    load_weights(chunks, ref, spec)
    for c in chunks:
        c.eval()
    return chunks


def load_weights(chunks, ref: CheckpointRef, spec: Qwen3Spec | None = None) -> None:
    """Load ``ref`` into existing chunks of the same architecture (collective)."""
    from megatron_rlrt.models.hf_checkpoint import load_hf_weights
    from megatron_rlrt.models.megatron_checkpoint import load_hf_into_model, load_model_checkpoint

    own = spec or ref.spec()
    theirs = ref.spec()
    if {**own.to_dict(), "dtype": None} != {**theirs.to_dict(), "dtype": None}:
        raise CheckpointError(f"{ref.path}: architecture {theirs} differs from the model being scored ({own})")
    if ref.kind == "hf":
        load_hf_into_model(chunks, own, load_hf_weights(ref.resolved, own))
    else:
        load_model_checkpoint(chunks, ref.resolved)


def check_same_architecture(refs) -> None:
    """CheckpointError naming the first checkpoint whose architecture differs from the first's."""
    first = refs[0].spec()
    for r in refs[1:]:
        s = r.spec()
        if {**s.to_dict(), "dtype": None} != {**first.to_dict(), "dtype": None}:
            raise CheckpointError(f"{r.path}: architecture differs from {refs[0].path} ({s} vs {first})")
