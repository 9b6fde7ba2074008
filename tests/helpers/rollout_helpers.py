"""Per-rank functions for the rollout-engine tests (spawned ranks import them by name)."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from megatron_rlrt import parallel


def vllm_weight_sync_rank(hf_dir: str, url: str, tp: int, out_path: str, prompt: list[int]) -> None:
    """A TP=``tp`` Megatron trainer: load the HF checkpoint, perturb the weights, push them to the
    vLLM server through iter_hf_tensors -> iter_weight_buckets -> VLLMEngine.update_weights,
    sample with log-probs, and compare the sampler's log-probs (and the server's teacher-forced
    log-probs of a fixed prompt) with the trainer's own forward pass."""
    from megatron_rlrt.models.forward import forward_logits
    from megatron_rlrt.models.hf_checkpoint import load_hf_weights
    from megatron_rlrt.models.megatron_checkpoint import iter_hf_tensors, load_hf_into_model
    from megatron_rlrt.models.qwen3 import Qwen3Spec, build_model, transformer_config
    from megatron_rlrt.rollout.base import SamplingParams, iter_weight_buckets
    from megatron_rlrt.rollout.vllm_engine import VLLMEngine

    parallel.initialize(parallel.ParallelLayout(tp, 1))
    rank = dist.get_rank()
    spec = Qwen3Spec.from_hf_dir(hf_dir)
    config = transformer_config(spec, tensor_model_parallel_size=tp, params_dtype=torch.float32,
                                perform_initialization=False)
    chunks = build_model(spec, config)
    load_hf_into_model(chunks, spec, load_hf_weights(hf_dir, spec))

    def trainer_logprobs(seq: list[int]) -> list[float]:
        logits = forward_logits(chunks, torch.tensor([seq]))[0]  # [S, V] fp32, full vocab on every TP rank
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].tolist()

    engine = VLLMEngine(rollout_urls=url, model_path=hf_dir, progress=False) if rank == 0 else None
    result: dict = {}
    if rank == 0:
        result["server_before"] = engine.prompt_logprobs([prompt])[0]
    # A training step's worth of change: perturb every weight (same seed on every rank), then
    # round to bf16 so the trainer runs exactly the weights the server will receive.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1234)
        for chunk in chunks:
            for name, p in sorted(chunk.named_parameters()):
                noise = torch.randn(p.shape, generator=g)
                scale = 0.1 if "word_embeddings" in name else 0.05
                p.add_(scale * noise.to(p.dtype)).copy_(p.to(torch.bfloat16).float())
    hf_bf16 = ((name, t.to(torch.bfloat16)) for name, t in iter_hf_tensors(chunks, spec))
    if rank == 0:
        engine.update_weights(iter_weight_buckets(hf_bf16, 4 * 1024 * 1024), version=1)
        result["weight_version"] = engine.weight_version
        result["served_versions"] = engine.served_weight_versions()
        result["weight_sync_s"] = engine.metrics["perf/weight_sync_s"]
        result["server_after"] = engine.prompt_logprobs([prompt])[0]
        groups = engine.generate([prompt, prompt[:5]], 4, SamplingParams(max_new_tokens=24, temperature=1.0, seed=7))
        samples = [(g_i, s.response_ids, s.logprobs) for g_i, group in enumerate(groups) for s in group]
    else:
        for _ in hf_bf16:  # every TP rank takes part in the gathers
            pass
        samples = None
    box = [samples]
    dist.broadcast_object_list(box, src=0)
    samples = box[0]
    result["trainer_prompt"] = trainer_logprobs(prompt)
    diffs = []
    for g_i, response, sampler_lp in samples:
        p = prompt if g_i == 0 else prompt[:5]
        full = trainer_logprobs(p + response)[len(p) - 1:]
        diffs.append([abs(a - b) for a, b in zip(full, sampler_lp)])
    result["sample_abs_diffs"] = diffs
    result["n_response_tokens"] = [len(r) for _, r, _ in samples]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    parallel.destroy()
