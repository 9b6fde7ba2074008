"""Hugging Face <-> Megatron conversion and parity checking (the logic behind tools/).

Each function validates its inputs in the launching process (config, layout, output dir)
before any rank starts, then runs the per-rank work through ``parallel.spawn`` (own ranks
on one machine) or under an existing torchrun.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from megatron_rlrt import parallel
from megatron_rlrt.fsutil import atomic_output_dir, check_output_dir
from megatron_rlrt.models.hf_checkpoint import load_hf_weights, save_hf_checkpoint
from megatron_rlrt.models.megatron_checkpoint import (
    HF_DIR,
    iter_hf_tensors,
    load_hf_into_model,
    load_model_checkpoint,
    read_metadata,
    save_model_checkpoint,
)
from megatron_rlrt.models.qwen3 import CheckpointError, Qwen3Spec, build_model, read_hf_config, transformer_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _log(msg: str) -> None:
    if _rank0():
        print(msg, flush=True)


# --- HF -> Megatron ---------------------------------------------------------------------


def hf_to_megatron(hf_dir: str, output_dir: str, tp: int = 1, pp: int = 1,
                   params_dtype: str | None = None, overwrite: bool = False) -> None:
    """Convert a HF Qwen3 checkpoint to a megatron dist checkpoint written from a TP x PP layout."""
    spec = Qwen3Spec.from_hf_dir(hf_dir)
    spec.check_parallel(tp, pp)
    load_hf_weights(hf_dir, spec)  # validate every tensor header before starting ranks
    check_output_dir(output_dir, overwrite)
    dtype = params_dtype or spec.dtype
    if dtype not in DTYPES:
        raise ValueError(f"--params-dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    parallel.spawn(_hf_to_megatron_rank, tp * pp, hf_dir, output_dir, tp, pp, dtype, overwrite)


def _hf_to_megatron_rank(hf_dir, output_dir, tp, pp, dtype, overwrite):
    parallel.initialize(parallel.ParallelLayout(tp, pp))
    try:
        spec = Qwen3Spec.from_hf_dir(hf_dir)
        config = transformer_config(spec, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                    params_dtype=DTYPES[dtype], perform_initialization=False)
        chunks = build_model(spec, config)
        _log(f"loading {hf_dir} into megatron (TP={tp}, PP={pp}, {dtype})")
        load_hf_into_model(chunks, spec, load_hf_weights(hf_dir, spec))
        save_model_checkpoint(chunks, spec, output_dir, hf_dir, overwrite=overwrite,
                              params_dtype=dtype, source=os.path.abspath(hf_dir))
        _log(f"wrote megatron checkpoint to {output_dir}")
    finally:
        parallel.destroy()


# --- Megatron -> HF -----------------------------------------------------------------------


def resolve_checkpoint_dir(path: str) -> str:
    """A model checkpoint dir, or a run/checkpoint root whose ``latest`` names one."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            return resolve_checkpoint_dir(os.path.join(path, f.read().strip()))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return resolve_checkpoint_dir(os.path.join(path, "checkpoints"))
    raise CheckpointError(f"{path}: no metadata.json (not a megatron-rlrt checkpoint) and no 'latest' pointer")


def megatron_to_hf(megatron_dir: str, output_dir: str, dtype: str | None = None, overwrite: bool = False) -> None:
    """Write a HF checkpoint (config, safetensors, tokenizer) from a megatron checkpoint."""
    ckpt = resolve_checkpoint_dir(megatron_dir)
    meta = read_metadata(ckpt)
    spec = Qwen3Spec(**meta["spec"])
    dtype = dtype or meta.get("params_dtype") or spec.dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    check_output_dir(output_dir, overwrite)
    # dist checkpoints reshard on load, so one process at TP=PP=1 reads any layout.
    parallel.spawn(_megatron_to_hf_rank, 1, ckpt, output_dir, dtype, overwrite)


def _megatron_to_hf_rank(ckpt, output_dir, dtype, overwrite):
    parallel.initialize(parallel.ParallelLayout(1, 1))
    try:
        meta = read_metadata(ckpt)
        spec = Qwen3Spec(**meta["spec"])
        config = transformer_config(spec, params_dtype=DTYPES[dtype], perform_initialization=False)
        chunks = build_model(spec, config)
        load_model_checkpoint(chunks, ckpt)
        hf_config = read_hf_config(os.path.join(ckpt, HF_DIR))
        hf_config["dtype"] = dtype
        hf_config.pop("torch_dtype", None)
        with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
            save_hf_checkpoint(tmp, hf_config, iter_hf_tensors(chunks, spec), aux_dir=os.path.join(ckpt, HF_DIR))
        _log(f"wrote Hugging Face checkpoint to {output_dir}")
    finally:
        parallel.destroy()


# --- parity ---------------------------------------------------------------------------------

DEFAULT_PROMPTS = (
    "What is 17 * 23? Think step by step.",
    "Solve for x: 2x + 3 = 11.",
    "The quick brown fox jumps over the lazy dog.",
)


@dataclass
class Parity:
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float
    tokens: int

    def ok(self, tolerance: float, min_top1: float) -> bool:
        return self.max_abs_logit_diff <= tolerance and self.top1_agreement >= min_top1


def compare(hf_dir: str, megatron_dir: str, tp: int = 1, pp: int = 1, prompts=DEFAULT_PROMPTS,
            result_file: str | None = None) -> Parity:
    """Run HF and Megatron (at TP x PP) on the same prompts in float32; return the parity."""
    import tempfile

    spec = Qwen3Spec.from_hf_dir(hf_dir)
    spec.check_parallel(tp, pp)
    ckpt = resolve_checkpoint_dir(megatron_dir)
    theirs = Qwen3Spec(**read_metadata(ckpt)["spec"])
    if {**theirs.to_dict(), "dtype": None} != {**spec.to_dict(), "dtype": None}:
        raise CheckpointError(f"{hf_dir} and {ckpt} are different architectures: {spec} vs {theirs}")
    token_ids = prompt_token_ids([hf_dir, os.path.join(ckpt, HF_DIR)], list(prompts), spec.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = result_file or os.path.join(tmp, "parity.json")
        parallel.spawn(_compare_rank, tp * pp, hf_dir, ckpt, tp, pp, token_ids, out)
        with open(out, encoding="utf-8") as f:
            return Parity(**json.load(f))


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def prompt_token_ids(dirs: list[str], prompts: list[str], vocab_size: int) -> list[list[int]]:
    """The compared token ids, all of one length: the prompts through the first of ``dirs``
    with tokenizer files (the HF dir, then the checkpoint's hf/), else fixed ids below
    ``vocab_size`` (said in one line): logits parity needs tokens, not a particular tokenizer."""
    from megatron_rlrt.tokenizer import load_tokenizer

    for d in dirs:
        if any(os.path.isfile(os.path.join(d, f)) for f in _TOKENIZER_FILES):
            tok = load_tokenizer(d)
            ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
            length = min(len(i) for i in ids)
            if length == 0:
                raise ValueError(f"a prompt tokenizes to no tokens with the tokenizer of {d}; pass non-empty --prompt")
            if max(max(i[:length]) for i in ids) < vocab_size:
                _log(f"tokenizer: {d}")
                return [i[:length] for i in ids]
    _log(f"tokenizer: no tokenizer files in {' or '.join(dirs)}; comparing on fixed token ids instead of prompts")
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (len(prompts), 16), generator=g).tolist()


def _compare_rank(hf_dir, ckpt, tp, pp, token_ids, out):
    import torch.distributed as dist

    from megatron_rlrt.models.forward import forward_logits

    parallel.initialize(parallel.ParallelLayout(tp, pp))
    try:
        spec = Qwen3Spec(**read_metadata(ckpt)["spec"])
        config = transformer_config(spec, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                    params_dtype=torch.float32, perform_initialization=False)
        chunks = build_model(spec, config)
        load_model_checkpoint(chunks, ckpt)
        for c in chunks:
            c.eval()
        tokens = torch.tensor(token_ids)
        logits = forward_logits(chunks, tokens)
        last = dist.get_world_size() - 1
        result = [None]
        if dist.get_rank() == last:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            with torch.no_grad():
                ref = hf(tokens).logits.float()
            diff = (logits.cpu() - ref).abs()
            result[0] = Parity(diff.max().item(), diff.mean().item(),
                               (logits.cpu().argmax(-1) == ref.argmax(-1)).float().mean().item(), tokens.numel())
        dist.broadcast_object_list(result, src=last)
        # every rank writes (atomically): under torchrun each process has its own result path
        tmp_out = f"{out}.{dist.get_rank()}.tmp"
        with open(tmp_out, "w", encoding="utf-8") as f:
            json.dump(result[0].__dict__, f)
        os.replace(tmp_out, out)
    finally:
        parallel.destroy()
