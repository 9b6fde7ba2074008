#!/usr/bin/env python
"""Per-GPU memory plan of an RLRT training job, and a recommended layout.

Terms per GPU (bytes), for megatron-core with DDP (fp32 gradient buffer), Adam and the
trainer's two passes:
  weights        P_gpu x 2 (bf16) or 4 (fp32); P_gpu = this GPU's parameters (TP/PP split;
                 embeddings and LM head on the first/last stage)
  gradients      P_gpu x 4 (megatron's fp32 main-grad buffer)
  optimizer      P_gpu x 12 (fp32 master + Adam m, v); / (DP x CP) with --use-distributed-optimizer
  activations    training pass: tokens per GPU x layers per stage x saved bytes per token and layer
                 (the tensors each module keeps for backward, listed in ``layer_activation_elements``;
                 full recompute keeps only each layer's input plus one layer being recomputed)
  log-prob       fused-linear op: two logit tiles [tokens, <=4096 columns] (<= 2^24 elements each)
                 materialised logits (the old path, for comparison): [tokens, V/TP] fp32 x 3
                 (logits, softmax, gradient)
  no-grad pass   student + teacher rows (--log-probs-max-tokens-per-gpu): nothing kept for backward;
                 its peak is one layer's working set plus the log-prob buffers
Tokens per GPU of a pass = max(budget, longest row / CP): a row longer than the budget gets its
own micro-batch and CP splits it.

Two activation models: ``te`` (GPU: Transformer Engine LayerNormLinear, fused RoPE, flash/fused
attention saving q, k, v, output and the log-sum-exp) and ``local`` (CPU: megatron's local spec
with torch RMSNorm and this project's PackedCoreAttention, which keeps the GQA-expanded K/V of
every row). The ``local`` model's activation and log-prob terms were validated against the peak
RSS measured on this CPU at tiny shapes: ``--validate-cpu`` reruns that check (forward + backward
of a hidden-96 Qwen3 with the real vocabulary at two token counts; the per-token slope of the
measured peak vs the predicted one, within 20 %). Measured 2026-12-06 on the 2-core dev machine
(hidden 96, 2 layers, rows of 4,096 tokens): extra peak 0.327 GB at 8,192 tokens and 0.959 GB at
32,768, predicted 0.336 and 0.942; per-token slope measured/predicted 1.04. The ``te`` model uses
the same accounting with TE's saved tensors; it has not been checked on a GPU.

    python tools/plan_memory.py --model qwen3-8b --tensor-model-parallel-size 2 --recompute-granularity full \\
        --max-tokens-per-gpu 16384 --response-len 20480 --num-gpus 8 --gpu h100
    python tools/plan_memory.py --model qwen3-4b --recommend --gpu b200
    python tools/plan_memory.py --validate-cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlrt.models.qwen3 import Qwen3Spec  # noqa: E402  (the model: the trainer's own config.json reader)

GB = 1e9
# Qwen3 dense configs (config.json of Qwen/Qwen3-4B and Qwen/Qwen3-8B) as the trainer reads them
_QWEN3 = dict(vocab_size=151936, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
              rope_theta=1000000.0, max_position_embeddings=40960)
PRESETS = {
    "qwen3-4b": Qwen3Spec(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, tie_word_embeddings=True,
                          **_QWEN3),
    "qwen3-8b": Qwen3Spec(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, tie_word_embeddings=False,
                          **_QWEN3),
}
GPUS = {"h100": 80.0, "b200": 180.0}  # usable HBM, GB
FUSED_TILE_ELEMENTS = 1 << 24  # megatron_rlrt.trainer.logprobs.FUSED_TILE_ELEMENTS


def attention_widths(m: Qwen3Spec) -> tuple[int, int]:
    """(query width, key/value width) = heads x head_dim."""
    return m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim


def layer_params(m: Qwen3Spec) -> int:
    """Parameters of one decoder layer: QKV and output projections, SwiGLU MLP, two RMSNorms, q/k norms."""
    (h, f), (q, kv) = (m.hidden_size, m.intermediate_size), attention_widths(m)
    return h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h + 2 * m.head_dim


def gpu_params(m: Qwen3Spec, tp: int, pp: int, first: bool = True) -> float:
    """Parameters on the most loaded GPU (the first stage holds the embedding; with tied weights
    and PP > 1 the last stage holds a copy too)."""
    layers = m.num_hidden_layers / pp * layer_params(m) / tp
    emb = m.vocab_size * m.hidden_size / tp
    head = 0 if (m.tie_word_embeddings and pp == 1) else emb
    return layers + (emb + head if pp == 1 else max(emb, head)) + m.hidden_size


def layer_activation_elements(m: Qwen3Spec, tp: int, cp: int, sp: bool, kind: str) -> float:
    """Elements kept for backward per local token and layer (without recompute).

    local (CPU spec): RMSNorm x2 (input, rstd, normed, scaled: 3h + 1 each); q/k RMSNorm (input
    and normed q, the qkv storage, normed k, rstd per head); RoPE cos/sin (4 x head_dim);
    PackedCoreAttention's checkpoint inputs (q and the GQA-expanded K and V of the WHOLE row, so
    x CP: the all-gathered keys); the projection input (q); fc1 output (2f) and SwiGLU's three
    f-sized pieces.
    te (GPU spec): LayerNormLinear x2 (input and normed output: 2h each, rstd); q/k norm inputs
    (q + kv); fused attention's q, k, v, output (q + 2kv + q) and log-sum-exp (heads, fp32);
    fc1 output (2f) and SwiGLU output (f)."""
    (h, f, d), (q, kv) = (m.hidden_size, m.intermediate_size, m.head_dim), attention_widths(m)
    heads, groups = m.num_attention_heads, m.num_key_value_heads
    hs = h / tp if sp else h  # hidden-sized tensors are split over TP only with sequence parallelism
    if kind == "local":
        return 2 * (3 * hs + 1) + (2 * q + heads + q + 2 * kv + groups + kv) / tp + 4 * d \
            + (q + 2 * q * cp) / tp + q / tp + 5 * f / tp
    return 2 * (2 * hs) + 2 + (q + kv) / tp + (q + 2 * kv + q + 2 * heads) / tp + 3 * f / tp


def model_extra_elements(m: Qwen3Spec, tp: int, sp: bool) -> float:
    """Per token, once per pass (not per layer): the final norm (input, rstd, output), the
    fused-linear op's saved hidden state and its fp32 gradient."""
    hs = m.hidden_size / tp if sp else m.hidden_size
    return 3 * hs + 1 + 2 * m.hidden_size


def backward_working_elements(m: Qwen3Spec, tp: int, sp: bool) -> float:
    """Per token: gradients alive at once inside one layer's backward (on top of everything kept):
    the MLP's (fc2 input, SwiGLU input 2f, hidden-sized input/output grads) or the attention's
    (q, the expanded K/V grads, the qkv grad), whichever is larger."""
    hs = m.hidden_size / tp if sp else m.hidden_size
    q, kv = attention_widths(m)
    return max(3 * m.intermediate_size / tp + 2 * hs, (3 * q + 2 * kv) / tp + hs)


@dataclass
class Plan:
    terms: dict
    total_gb: float
    notes: list


def plan(m: Qwen3Spec, *, tp=1, pp=1, cp=1, num_gpus=8, max_tokens_per_gpu=16384, log_probs_max_tokens_per_gpu=None,
         response_len=20480, prompt_len=1024, teacher_extra_len=2048, recompute=None, recompute_num_layers=1,
         distributed_optimizer=True, sp=False, dtype_bytes=2, kind="te", fused=True) -> Plan:
    dp = num_gpus // (tp * pp * cp)
    if dp < 1 or num_gpus % (tp * pp * cp):
        raise ValueError(f"--num-gpus {num_gpus} is not a multiple of TP x PP x CP = {tp * pp * cp}")
    p = gpu_params(m, tp, pp)
    act_bytes = 4 if dtype_bytes == 4 else 2
    student_row = prompt_len + response_len
    teacher_row = prompt_len + teacher_extra_len + response_len
    train_tokens = max(max_tokens_per_gpu, math.ceil(student_row / cp))
    lp_budget = log_probs_max_tokens_per_gpu or max_tokens_per_gpu
    lp_tokens = max(lp_budget, math.ceil(teacher_row / cp))
    layers = m.num_hidden_layers / pp
    per_layer = layer_activation_elements(m, tp, cp, sp, kind) * act_bytes
    layer_input = (m.hidden_size / tp if sp else m.hidden_size) * act_bytes
    if recompute == "full":
        # uniform: each group of N layers keeps its input; one group is recomputed at a time
        kept = train_tokens * (layers / recompute_num_layers * layer_input + recompute_num_layers * per_layer)
    else:
        kept = train_tokens * layers * per_layer
    in_flight = pp  # 1F1B: the first stage holds up to PP micro-batches of activations
    activations = kept * in_flight + train_tokens * (model_extra_elements(m, tp, sp)
                                                     + backward_working_elements(m, tp, sp)) * act_bytes
    def logprob_buffer(tokens):
        if fused:
            chunk = max(128, min(4096, FUSED_TILE_ELEMENTS // max(1, tokens)))
            return 2 * tokens * chunk * 4
        return 3 * tokens * m.vocab_size / tp * 4
    # no-grad pass: one layer's working set (its saved-tensor equivalent, freed after the layer)
    nograd = lp_tokens * per_layer + logprob_buffer(lp_tokens)
    terms = {
        "weights": p * dtype_bytes,
        "gradients": p * 4,
        "optimizer": p * 12 / (dp * cp if distributed_optimizer else 1),
        "activations (training pass)": activations,
        "log-prob buffers (training pass)": logprob_buffer(train_tokens),
        "no-grad student+teacher pass peak": nograd,
    }
    static = terms["weights"] + terms["gradients"] + terms["optimizer"]
    total = static + max(activations + terms["log-prob buffers (training pass)"], nograd)
    notes = [f"TP={tp} PP={pp} CP={cp} DP={dp}; tokens per GPU: training {train_tokens}, no-grad {lp_tokens}",
             f"activations: {per_layer / 1024:.1f} KiB per token and layer ({kind} spec, "
             f"recompute={recompute or 'none'})"]
    return Plan({k: v / GB for k, v in terms.items()}, total / GB, notes)


def recommend(m: Qwen3Spec, gpu_gb: float, num_gpus: int = 8, **kw) -> list[tuple[dict, Plan]]:
    """Layouts that fit in 90 % of the GPU, most data-parallel first, then the least recompute."""
    fits = []
    for tp in (1, 2, 4, 8):
        for cp in (1, 2, 4, 8):
            if tp * cp > num_gpus or m.num_attention_heads % tp or m.num_key_value_heads % tp:
                continue
            for recompute in (None, "full"):
                layout = dict(tp=tp, cp=cp, recompute=recompute)
                pl = plan(m, tp=tp, cp=cp, num_gpus=num_gpus, recompute=recompute, **kw)
                if pl.total_gb <= 0.9 * gpu_gb:
                    fits.append((layout, pl))
    fits.sort(key=lambda lp: (lp[0]["tp"] * lp[0]["cp"], lp[0]["recompute"] is not None, lp[1].total_gb))
    return fits


# ---------------------------------------------------------------------------- CPU validation


def _measure_rank(hidden, layers, rows, out_path):
    """Extra peak RSS of forward + backward (fp32, local spec, fused-linear log-probs) of a packed
    batch of ``rows`` token counts."""
    import torch

    from megatron_rlrt import parallel, procmem

    parallel.initialize(parallel.ParallelLayout())
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_rlrt.models.qwen3 import Qwen3Spec, build_model, transformer_config
    from megatron_rlrt.ops import fused_linear_logprobs
    from megatron_rlrt.trainer.logprobs import fused_chunk_size
    from tools.make_tiny_qwen3 import make_tiny_qwen3

    d = os.path.join(os.path.dirname(out_path), f"model-{hidden}")
    hf = make_tiny_qwen3(d, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         max_position_embeddings=65536, seed=0, overwrite=True)
    spec = Qwen3Spec.from_hf_dir(hf)
    model = build_model(spec, transformer_config(spec, params_dtype=torch.float32))[0]
    n = sum(rows)
    tokens = torch.randint(0, spec.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0] + rows).cumsum(0).to(torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(rows),
                             max_seqlen_kv=max(rows))

    def step():
        hidden_states = model(input_ids=tokens, position_ids=None, attention_mask=None, packed_seq_params=params,
                              output_processor=lambda hidden_states, **_: hidden_states)
        h2 = hidden_states[:, 0]
        lp, _ = fused_linear_logprobs(h2, model.output_layer.weight if model.output_layer.weight is not None
                                      else model.shared_embedding_or_output_weight(), tokens[0].roll(-1),
                                      chunk_size=fused_chunk_size(n))
        lp.sum().backward()
        model.zero_grad(set_to_none=False)

    # Peak RSS of this step alone: reset the kernel's VmHWM to the current RSS, then read it back.
    # Not ru_maxrss: Linux carries the parent's high-water RSS across fork+exec into it, so under a
    # 1 GB pytest process every size read a flat ~1.07 GB (the cause of the old in-suite failure).
    before = procmem.reset_peak()
    step()
    peak = procmem.peak_bytes()
    with open(out_path, "w") as f:
        json.dump({"tokens": n, "extra_peak_bytes": peak - before}, f)
    parallel.destroy()


def validate_cpu(hidden=96, layers=2, counts=(8192, 32768), row=4096, tmp=None) -> dict:
    """Measured vs predicted per-token slope of the extra peak RSS (local spec, fp32)."""
    import subprocess
    import tempfile

    tmp = tmp or tempfile.mkdtemp(prefix="plan_memory_")
    measured = []
    for n in counts:  # a fresh process per size: peak RSS is per process
        out = os.path.join(tmp, f"m{n}.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--measure-one", json.dumps(
            [hidden, layers, [row] * (n // row), out])], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        with open(out) as f:
            measured.append(json.load(f))
    m = Qwen3Spec(vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, max_position_embeddings=65536, tie_word_embeddings=True)

    def predicted(n):
        per_layer = layer_activation_elements(m, 1, 1, False, "local") * 4
        chunk = max(128, min(4096, FUSED_TILE_ELEMENTS // n))
        extra = (model_extra_elements(m, 1, False) + backward_working_elements(m, 1, False)) * 4
        return n * (layers * per_layer + extra) + 2 * n * chunk * 4

    (n1, n2), (m1, m2) = counts, (measured[0]["extra_peak_bytes"], measured[1]["extra_peak_bytes"])
    slope_measured = (m2 - m1) / (n2 - n1)
    slope_predicted = (predicted(n2) - predicted(n1)) / (n2 - n1)
    return {"tokens": list(counts), "measured_extra_peak_gb": [m1 / GB, m2 / GB],
            "predicted_gb": [predicted(n1) / GB, predicted(n2) / GB],
            "bytes_per_token_measured": slope_measured, "bytes_per_token_predicted": slope_predicted,
            "ratio": slope_measured / slope_predicted}


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf-dir", help="Qwen3 checkpoint (or config) directory with config.json")
    src.add_argument("--model", choices=sorted(PRESETS), default="qwen3-8b", help="built-in Qwen3 config")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size (splits heads, MLP, vocabulary)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size (1F1B: the first stage "
                   "holds PP micro-batches of activations)")
    p.add_argument("--context-parallel-size", type=int, default=1, help="CP size (splits every row over CP ranks)")
    p.add_argument("--num-gpus", type=int, default=8, help="training GPUs (DP = this / (TP x PP x CP))")
    p.add_argument("--max-tokens-per-gpu", type=int, default=16384, help="training micro-batch budget")
    p.add_argument("--log-probs-max-tokens-per-gpu", type=int, help="no-grad pass budget (default: training's)")
    p.add_argument("--response-len", type=int, default=20480, help="longest response")
    p.add_argument("--prompt-len", type=int, default=1024, help="longest prompt")
    p.add_argument("--teacher-extra-len", type=int, default=2048, help="teacher-prompt context (peer solution)")
    p.add_argument("--recompute-granularity", choices=("full",), help="full activation recompute")
    p.add_argument("--recompute-num-layers", type=int, default=1, help="layers per recompute unit (uniform)")
    p.add_argument("--no-distributed-optimizer", action="store_true", help="Adam states replicated over DP")
    p.add_argument("--sequence-parallel", action="store_true", help="split hidden-sized activations over TP")
    p.add_argument("--materialized-logits", action="store_true", help="the old log-prob path, for comparison")
    p.add_argument("--spec", choices=("te", "local"), default="te", help="activation model (GPU TE or CPU local)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU memory: h100 80 GB, b200 180 GB")
    p.add_argument("--recommend", action="store_true", help="list layouts that fit, best first")
    p.add_argument("--validate-cpu", action="store_true", help="measure on this CPU and compare (~1-3 min)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--measure-one", help=argparse.SUPPRESS)  # internal: one --validate-cpu measurement
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.measure_one:
        from megatron_rlrt import parallel

        parallel.spawn(_measure_rank, 1, *json.loads(args.measure_one))
        return 0
    if args.validate_cpu:
        res = validate_cpu()
        print(json.dumps(res, indent=1))
        ok = abs(res["ratio"] - 1) <= 0.2
        print(f"measured / predicted bytes per token: {res['ratio']:.3f} ({'within' if ok else 'OUTSIDE'} 20 %)")
        return 0 if ok else 1
    m = Qwen3Spec.from_hf_dir(args.hf_dir) if args.hf_dir else PRESETS[args.model]
    kw = dict(max_tokens_per_gpu=args.max_tokens_per_gpu, log_probs_max_tokens_per_gpu=args.log_probs_max_tokens_per_gpu,
              response_len=args.response_len, prompt_len=args.prompt_len, teacher_extra_len=args.teacher_extra_len,
              recompute_num_layers=args.recompute_num_layers, distributed_optimizer=not args.no_distributed_optimizer,
              sp=args.sequence_parallel, kind=args.spec, fused=not args.materialized_logits,
              pp=args.pipeline_model_parallel_size)
    gpu_gb = GPUS[args.gpu]
    if args.recommend:
        fits = recommend(m, gpu_gb, args.num_gpus, **kw)
        rows = [{**layout, "total_gb": round(pl.total_gb, 1)} for layout, pl in fits]
        if args.json:
            print(json.dumps(rows))
        elif not rows:
            print(f"nothing fits in 90 % of {gpu_gb:.0f} GB; raise --num-gpus or lower the budgets")
        else:
            print(f"{'TP':>3} {'CP':>3} {'recompute':>9} {'GB/GPU':>7}   (fits in 90 % of {gpu_gb:.0f} GB, best first)")
            for r in rows:
                print(f"{r['tp']:>3} {r['cp']:>3} {str(r['recompute'] or '-'):>9} {r['total_gb']:>7.1f}")
        return 0
    pl = plan(m, tp=args.tensor_model_parallel_size, cp=args.context_parallel_size, num_gpus=args.num_gpus,
              recompute=args.recompute_granularity, **kw)
    if args.json:
        print(json.dumps({"terms_gb": pl.terms, "total_gb": pl.total_gb, "notes": pl.notes}))
        return 0
    for note in pl.notes:
        print(note)
    for name, v in pl.terms.items():
        print(f"  {name:36} {v:8.2f} GB")
    print(f"  {'peak (static + larger pass)':36} {pl.total_gb:8.2f} GB of {gpu_gb:.0f} GB ({args.gpu})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
