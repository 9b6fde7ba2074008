"""Per-rank functions for the long-context tests (context parallelism, packed attention).

Spawned through megatron_rlrt.parallel.spawn, so they live in a module; results go back as
JSON (or torch) files written by rank 0.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from megatron_rlrt import parallel


def dense_reference_attention(q, k, v, lengths, scale):
    """Block-diagonal causal attention with an explicit [T, T] mask (the independent reference)."""
    t, hq, _ = q.shape
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(t)
    visible = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    k = k.repeat_interleave(hq // k.shape[1], dim=1)
    v = v.repeat_interleave(hq // v.shape[1], dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def attention_inputs(lengths, hq=4, hk=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    return [torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (hq, hk, hk)] + \
        [torch.randn(t, hq, d, generator=g, dtype=torch.float64)]


def cp_attention_rank(lengths, block, out_path, keep_group=False):
    """Zigzag-split attention over the CP group (= the world) vs the dense reference on all tokens
    (``keep_group``: leave the process group up for a next check in the same ranks)."""
    from megatron_rlrt.models.packed_attention import packed_causal_attention
    from megatron_rlrt.packing import zigzag_index

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, w = attention_inputs(lengths)
    scale = 0.3
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = dense_reference_attention(*ref_leaves, lengths, scale)
    (ref * w).sum().backward()
    cu = torch.tensor([0] + lengths).cumsum(0)
    idx = zigzag_index(cu, cp, rank)
    leaves = [x[idx].clone().requires_grad_() for x in (q, k, v)]
    out = packed_causal_attention(*leaves, lengths, scale=scale, cp_group=dist.group.WORLD, block=block)
    (out * w[idx]).sum().backward()
    result = {
        "out": (out - ref[idx]).abs().max().item(),
        # each rank's K/V gradient is the all-reduced total over every rank's queries
        "grads": [(leaf.grad - r.grad[idx]).abs().max().item() for leaf, r in zip(leaves, ref_leaves)],
    }
    results = [None] * cp
    dist.all_gather_object(results, result)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    if not keep_group:
        dist.destroy_process_group()


def cp2_checks_rank(attention_args, model_args):
    """Both 2-rank context-parallel checks in one start of the ranks (each start costs a torch +
    megatron import per rank): the bare attention, then the model (``cp_model_rank``)."""
    cp_attention_rank(*attention_args, keep_group=True)
    cp_model_rank(*model_args)


def _thd(cu, max_seqlen):
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_seqlen,
                           max_seqlen_kv=max_seqlen)


def _packed_logprob_pass(chunks, packed, cp, cp_rank, weights):
    """Local forward of a zigzag-split packed batch; returns (full-order per-position log p(label)
    gathered over CP, the weighted loss's parameter grads summed over CP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_rlrt.packing import zigzag_index

    model = chunks[0]
    idx = zigzag_index(packed.cu_seqlens, cp, cp_rank)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=packed.tokens[:, idx], position_ids=packed.position_ids[:, idx], attention_mask=None,
                   packed_seq_params=_thd(packed.cu_seqlens, packed.max_seqlen))  # [1, t, V/TP]
    logp = -vocab_parallel_cross_entropy(logits.transpose(0, 1).float().contiguous(),
                                         packed.labels[:, idx].t().contiguous())[:, 0]  # [t]
    keep = packed.label_mask[0, idx]
    (-(logp * keep * weights[idx]).sum()).backward()
    full = torch.zeros(packed.num_tokens, dtype=torch.float64)
    full[idx] = logp.detach().double() * keep
    if cp > 1:
        dist.all_reduce(full, group=ps.get_context_parallel_group())
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if cp > 1:
            dist.all_reduce(g, group=ps.get_context_parallel_group())
        grads[name] = g
    return full, grads


def cp_model_rank(hf_dir, tp, cp, rows, out_path):
    """A packed batch through megatron's GPTModel (local spec) at TP x CP, then at TP x CP=1 on the
    same ranks: per-position log-probs and parameter gradients (summed over CP) of both, plus the
    Hugging Face model's per-row log-probs as the independent reference."""
    from megatron_rlrt.platform import setup_megatron

    setup_megatron()
    from megatron.core import parallel_state as ps

    from megatron_rlrt.models.hf_checkpoint import load_hf_weights
    from megatron_rlrt.models.megatron_checkpoint import load_hf_into_model
    from megatron_rlrt.models.qwen3 import Qwen3Spec, build_model, transformer_config
    from megatron_rlrt.packing import PackRow, pack_rows

    spec = Qwen3Spec.from_hf_dir(hf_dir)
    weights_hf = load_hf_weights(hf_dir, spec)
    rows = [PackRow(p, r, "student", i) for i, (p, r) in enumerate(rows)]
    results = {}
    for size in (cp, 1):
        parallel.initialize(parallel.ParallelLayout(tp, 1, None, size))
        config = transformer_config(spec, tensor_model_parallel_size=tp, context_parallel_size=size,
                                    params_dtype=torch.float32, perform_initialization=False)
        chunks = build_model(spec, config)
        load_hf_into_model(chunks, spec, weights_hf)
        packed = pack_rows(rows, segment_multiple=2 * size)
        weights = 0.5 + (packed.labels[0] % 7) / 7.0  # per token, independent of the padding layout
        full, grads = _packed_logprob_pass(chunks, packed, size, ps.get_context_parallel_rank(), weights)
        # per-row response log-probs (independent of the padding layout)
        student, mask = packed.gather_student(full)
        results[size] = (student, mask, grads)
        ps.destroy_model_parallel()
    out = {}
    (s_cp, m_cp, g_cp), (s_1, m_1, g_1) = results[cp], results[1]
    out["logprob_max_abs_diff"] = (s_cp - s_1).abs().max().item()
    out["grad_max_rel_diff"] = max(((g_cp[n] - g_1[n]).norm() / g_1[n].norm().clamp_min(1e-30)).item() for n in g_1)
    out["grad_norm"] = sum(g.norm().item() ** 2 for g in g_1.values()) ** 0.5
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
        diffs = []
        for i, row in enumerate(rows):
            seq = torch.tensor([list(row.prompt_ids) + list(row.response_ids)])
            with torch.no_grad():
                lp = hf(seq).logits[0].log_softmax(-1)
            p = len(row.prompt_ids)
            ref = torch.stack([lp[p - 1 + j, t] for j, t in enumerate(row.response_ids)])
            diffs.append((s_cp[i, : len(ref)] - ref).abs().max().item())
        out["hf_max_abs_diff"] = max(diffs)
        with open(out_path, "w") as f:
            json.dump(out, f)
    parallel.destroy()


RECOMPUTE_VARIANTS = {
    "none": {},
    "full_uniform_1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_uniform_2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full_block_3": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
    "selective": dict(recompute_granularity="selective"),
}


def recompute_rank(hf_dir, rows, out_path):
    """The same packed loss with every recompute setting: log-probs and gradients per setting,
    and whether megatron actually took its checkpointed path."""
    from megatron_rlrt.platform import setup_megatron

    setup_megatron()
    from megatron.core import tensor_parallel

    from megatron_rlrt.models.hf_checkpoint import load_hf_weights
    from megatron_rlrt.models.megatron_checkpoint import load_hf_into_model
    from megatron_rlrt.models.qwen3 import Qwen3Spec, build_model, transformer_config
    from megatron_rlrt.packing import PackRow, pack_rows

    spec = Qwen3Spec.from_hf_dir(hf_dir)
    weights_hf = load_hf_weights(hf_dir, spec)
    packed = pack_rows([PackRow(p, r, "student", i) for i, (p, r) in enumerate(rows)])
    parallel.initialize(parallel.ParallelLayout())
    calls = {"n": 0}
    original = tensor_parallel.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    out = {}
    ref = None
    for name, kwargs in RECOMPUTE_VARIANTS.items():
        config = transformer_config(spec, params_dtype=torch.float32, perform_initialization=False, **kwargs)
        chunks = build_model(spec, config)
        load_hf_into_model(chunks, spec, weights_hf)
        calls["n"] = 0
        tensor_parallel.checkpoint = counting  # megatron calls it as tensor_parallel.checkpoint(...)
        try:
            full, grads = _packed_logprob_pass(chunks, packed, 1, 0, 0.5 + (packed.labels[0] % 7) / 7.0)
        finally:
            tensor_parallel.checkpoint = original
        if ref is None:
            ref = (full, grads)
        out[name] = {
            "checkpoint_calls": calls["n"],
            "logprob_max_abs_diff": (full - ref[0]).abs().max().item(),
            "grad_max_rel_diff": max(((grads[n] - ref[1][n]).norm() / ref[1][n].norm().clamp_min(1e-30)).item()
                                     for n in grads),
        }
    with open(out_path, "w") as f:
        json.dump(out, f)
    parallel.destroy()


def fixed_rlrt_batch(prompt_len: int, peer_len: int, response_len: int, vocab: int = 151_000, seed: int = 0,
                     teacher_for_all: bool = False):
    """A rollout batch of fixed token ids (no sampling): one group of two responses of
    ``response_len`` tokens, the first correct (with its teacher row: prompt + a peer solution +
    the same response), the second wrong (with a teacher row too if ``teacher_for_all``, as the
    distillation methods build them)."""
    from megatron_rlrt.trainer.rollout_batch import RolloutBatch, Sample

    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    prompt, peer = ids(prompt_len), ids(peer_len)
    responses = [ids(response_len), ids(response_len)]
    samples = [Sample(0, 0, prompt, responses[0], [-1.0] * response_len, 1.0, True, 1.0, prompt + peer),
               Sample(1, 0, prompt, responses[1], [-1.0] * response_len, 0.0, False, -1.0,
                      prompt + peer if teacher_for_all else None)]
    tokens = 2 * (prompt_len + response_len) + prompt_len + peer_len + response_len
    return RolloutBatch(samples, 2, {"reward/mean": 0.5, "perf/batch_tokens": float(tokens)})


def long_step_rank(argv, lengths, out_path, teacher_for_all=False):
    """One full RLRT step (no-grad student+teacher pass, token advantages, PPO update) of the
    trainer on a fixed-token batch; rank 0 saves the collected log-probs, the gradients (after
    megatron's DP x CP reduction, before Adam) gathered over TP, the step metrics and the peak RSS
    of every rank."""
    import time

    from megatron_rlrt.config import parse_config
    from megatron_rlrt.trainer.trainer import Trainer
    from tests.helpers.trainer_helpers import register_test_rewards

    register_test_rewards()
    trainer = Trainer(parse_config(argv))
    batch = fixed_rlrt_batch(*lengths, teacher_for_all=teacher_for_all)
    trainer.make_batch = lambda step=0: batch
    record = {}
    collect = trainer.score

    def recording_collect(samples):
        out = collect(samples)
        record["student"] = {i: v.tolist() for i, v in out.student_logprobs.items()}
        record["teacher"] = {i: v.tolist() for i, v in out.teacher_logprobs.items()}
        if out.student_topk_ids:  # top-K distillation: the policy's ids and the teacher at them
            record["student_topk_ids"] = {i: v.tolist() for i, v in out.student_topk_ids.items()}
            record["teacher_topk"] = {i: v.tolist() for i, v in out.teacher_topk_logprobs.items()}
        return out

    trainer.score = recording_collect
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        from megatron.core import parallel_state as ps

        grads = {}
        for c in trainer.chunks:
            for name, p in c.module.named_parameters():
                g = p.main_grad.detach().float().clone()
                tp_split = getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1
                if tp_split >= 0 and ps.get_tensor_model_parallel_world_size() > 1:
                    parts = [torch.empty_like(g) for _ in range(ps.get_tensor_model_parallel_world_size())]
                    dist.all_gather(parts, g.contiguous(), group=ps.get_tensor_model_parallel_group())
                    g = torch.cat(parts, dim=tp_split)
                grads[name] = g
        record["grads"] = grads
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    from megatron_rlrt import procmem

    rss0 = procmem.reset_peak()  # the step's own peak is read below (not ru_maxrss: inherited across fork+exec)
    t0 = time.perf_counter()
    try:
        metrics = trainer.step(0)
    finally:
        trainer.close()
    seconds = time.perf_counter() - t0
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, {"peak_rss_gb": procmem.peak_bytes() / 1e9,
                                   "rss_before_step_gb": rss0 / 1e9, "step_s": seconds})
    if dist.get_rank() == 0:
        record["metrics"] = metrics
        record["ranks"] = peaks
        model = trainer.chunks[0].module
        record["sequence_parallel"] = bool(model.config.sequence_parallel)
        # norm weights whose TP-partial gradients megatron all-reduces under sequence parallelism
        record["sp_marked"] = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
        torch.save(record, out_path)
    parallel.destroy()
