"""The null-teacher probe: D_t = log P_S - log P_T from the trainer's packed no-grad pass when
the teacher sees no extra context, so every teacher row equals its student row.

Used by tests/test_precision.py (CPU, fp32 and bf16), benchmarks/bench_dt_noise.py (the bf16
noise on CPU) and tests/gpu/check_fp8.py (FP8 vs bf16 with Transformer Engine). Importable by
spawned ranks.
"""

from __future__ import annotations

import json
import time

import torch

from megatron_rlrt import parallel


def make_samples(n: int, seed: int = 0, teacher: str = "same", prompt_len: int = 6, response_len: int = 24,
                 vocab: int = 1000):
    """``n`` RL samples with random prompt/response ids of varied lengths. ``teacher``: "same"
    (empty teacher context: teacher prompt = student prompt) or "context" (the student prompt
    plus a random privileged context, for the size of a real D_t)."""
    from megatron_rlrt.trainer.rollout_batch import Sample

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        prompt = torch.randint(10, vocab, (prompt_len + 3 * (i % 4),), generator=g).tolist()
        response = torch.randint(10, vocab, (response_len + 5 * (i % 5),), generator=g).tolist()
        t_prompt = list(prompt)
        if teacher == "context":
            t_prompt = prompt + torch.randint(10, vocab, (16,), generator=g).tolist()
        samples.append(Sample(i, i // 2, prompt, response, [0.0] * len(response), 1.0, True, 1.0,
                              teacher_prompt_ids=t_prompt))
    return samples


def dt_stats(collected, samples) -> dict:
    """|D_t| over every response token, and what RLRT's eq. 6-7 does with it (A_t vs A)."""
    from megatron_rlrt.algorithms.token_advantages import token_advantages

    keys = [s.index for s in samples]
    d = torch.cat([collected.student_logprobs[k] - collected.teacher_logprobs[k] for k in keys]).double().abs()
    width = max(len(collected.student_logprobs[k]) for k in keys)
    s_lp = torch.zeros(len(keys), width)
    t_lp = torch.zeros(len(keys), width)
    mask = torch.zeros(len(keys), width, dtype=torch.bool)
    for row, k in enumerate(keys):
        n = len(collected.student_logprobs[k])
        s_lp[row, :n], t_lp[row, :n], mask[row, :n] = collected.student_logprobs[k], collected.teacher_logprobs[k], True
    adv = torch.ones(len(keys))
    a_t = token_advantages("rlrt", adv, torch.ones(len(keys)), s_lp, t_lp, mask, lam=0.5, eps_w=0.5)
    return {"tokens": int(d.numel()), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "p99_abs": float(d.quantile(0.99)), "exact_zero_fraction": float((d == 0).double().mean()),
            "max_abs_At_minus_A": float((a_t - adv[:, None])[mask].abs().max())}


def build_tiny(hf_dir: str, dtype: torch.dtype, fp8=None):
    """(chunks, StepOptions) of a 1-rank model from ``hf_dir`` in ``dtype``, FP8 flags ``fp8``
    (``precision.Fp8Options`` or None), padded as the trainer pads."""
    from megatron_rlrt import precision
    from megatron_rlrt.models.hf_checkpoint import load_hf_weights
    from megatron_rlrt.models.megatron_checkpoint import load_hf_into_model
    from megatron_rlrt.models.qwen3 import Qwen3Spec, build_model, transformer_config
    from megatron_rlrt.packing import pad_multiple
    from megatron_rlrt.platform import setup_megatron
    from megatron_rlrt.trainer.model_step import StepOptions

    platform = setup_megatron()
    spec = Qwen3Spec.from_hf_dir(hf_dir)
    config = transformer_config(spec, params_dtype=dtype, perform_initialization=False, fp8=fp8)
    chunks = build_model(spec, config)
    load_hf_into_model(chunks, spec, load_hf_weights(hf_dir, spec))
    for c in chunks:
        c.eval()
    multiple = pad_multiple(precision.fp8_pad_multiple(fp8 or precision.Fp8Options()))
    return chunks, StepOptions(use_te=platform.has_transformer_engine, pad_to_multiple_of=multiple)


def null_teacher_rank(hf_dir: str, dtype_name: str, out_path: str, n_samples: int = 8, micro_batch_sizes=(1, 4),
                      teachers=("same",), repeats: int = 1, fp8_flags: dict | None = None) -> None:
    """One rank: the trainer's ``collect`` (student + teacher rows in one packed no-grad forward)
    per teacher kind (see ``make_samples``) and micro-batch size; writes D_t statistics (and the
    pass time) as JSON keyed "teacher/micro_batch_size"."""
    from megatron_rlrt.precision import Fp8Options
    from megatron_rlrt.trainer.model_step import collect

    parallel.initialize(parallel.ParallelLayout(1, 1))
    try:
        fp8 = Fp8Options(**fp8_flags) if fp8_flags else None
        chunks, opts = build_tiny(hf_dir, getattr(torch, dtype_name), fp8)
        result = {}
        for teacher in teachers:
            samples = make_samples(n_samples, teacher=teacher)
            for mbs in micro_batch_sizes:
                if fp8 is not None or repeats > 1:  # warm-up (and the FP8 amax history) before timing
                    collect(chunks, samples, opts, mbs, None)
                t0 = time.perf_counter()
                for _ in range(repeats):
                    collected = collect(chunks, samples, opts, mbs, None)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                result[f"{teacher}/{mbs}"] = {**dt_stats(collected, samples),
                                              "seconds": (time.perf_counter() - t0) / repeats}
        with open(out_path, "w") as f:
            json.dump(result, f)
    finally:
        parallel.destroy()
