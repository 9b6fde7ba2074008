"""The embedded rollout engine: Hugging Face transformers in this process (CPU or one GPU).

Sampling is our own short loop over the model's KV cache rather than ``generate()``: it
returns exactly what RL needs (sampled ids + the log-prob of each under the temperature-scaled
distribution the trainer also uses) without keeping [steps, batch, vocab] score tensors, and
its randomness comes from one seeded generator, so a run is reproducible.

Log-probs are log softmax(logits / temperature) at the sampled token, before top-p/top-k
truncation: the same quantity the trainer computes, so the TIS ratio measures only
engine/trainer numerical drift (and truncation, when top-p < 1).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Sequence

import torch

from megatron_rlrt.rollout.base import RolloutError, RolloutSample, SamplingParams

logger = logging.getLogger(__name__)


class HFEngine:
    """In-process generation with a transformers ``Qwen3ForCausalLM``."""

    def __init__(self, hf_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch_size: int = 64, seed: int = 0, pad_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = (), progress: bool = False, num_threads: int | None = None):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(self.device).eval()
        self.max_batch_size = max_batch_size
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        cfg = self.model.generation_config
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.model.config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_token_ids = tuple(dict.fromkeys([*eos, *eos_token_ids]))
        self.pad_token_id = pad_token_id if pad_token_id is not None else (cfg.pad_token_id or (self.eos_token_ids or [0])[0])
        self.progress = progress
        # CPU threads while generating (the trainer's other ranks wait meanwhile); None: unchanged
        self.num_threads = num_threads
        self.weight_version = 0
        self._params = dict(self.model.named_parameters())

    # -- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams) -> list[list[RolloutSample]]:
        if n < 1:
            raise RolloutError(f"n must be >= 1, got {n}")
        if any(len(p) == 0 for p in prompts):
            raise RolloutError("empty prompt (no tokens) in the rollout batch")
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        threads = torch.get_num_threads()
        if self.num_threads and self.device.type == "cpu":
            torch.set_num_threads(self.num_threads)
        try:
            return self._generate(prompts, n, params)
        finally:
            torch.set_num_threads(threads)

    def _generate(self, prompts, n: int, params: SamplingParams) -> list[list[RolloutSample]]:
        jobs = [(i, list(p)) for i, p in enumerate(prompts) for _ in range(n)]
        results: list[list[RolloutSample]] = [[] for _ in prompts]
        chunks = range(0, len(jobs), self.max_batch_size)
        bar = _progress(self.progress, len(jobs), "rollout")
        for start in chunks:
            part = jobs[start : start + self.max_batch_size]
            for (index, _), sample in zip(part, self._sample([p for _, p in part], params)):
                sample.prompt_index = index
                results[index].append(sample)
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        return results

    def _sample(self, prompts: list[list[int]], params: SamplingParams) -> list[RolloutSample]:
        from transformers import DynamicCache

        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token is at the end
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        stop = torch.tensor(sorted(set(self.eos_token_ids) | set(params.stop_token_ids)) or [-1], device=self.device)
        out_ids = torch.full((batch, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=self.device)
        out_lp = torch.zeros((batch, params.max_new_tokens), dtype=torch.float32, device=self.device)
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        cache = DynamicCache()
        step_input, positions = ids, (attn.cumsum(-1) - 1).clamp(min=0)
        for t in range(params.max_new_tokens):
            logits = self.model(input_ids=step_input, attention_mask=attn, position_ids=positions,
                                past_key_values=cache, use_cache=True).logits[:, -1, :].float()
            token, logp = _sample_tokens(logits, params, self.generator)
            token = torch.where(finished, torch.full_like(token, self.pad_token_id), token)
            out_ids[:, t] = token
            out_lp[:, t] = logp
            lengths += (~finished).long()
            finished |= torch.isin(token, stop)
            if bool(finished.all()):
                break
            step_input = token[:, None]
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
        samples = []
        for i in range(batch):
            n_tok = int(lengths[i])
            ended = n_tok > 0 and int(out_ids[i, n_tok - 1]) in stop.tolist()
            samples.append(RolloutSample(-1, out_ids[i, :n_tok].tolist(), out_lp[i, :n_tok].tolist(),
                                         "stop" if ended else "length"))
        return samples

    # -- weights -------------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """Copy HF-named full tensors into the model; every parameter must arrive exactly once."""
        start, seen = time.perf_counter(), set()
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        for bucket in buckets:
            for name, tensor in bucket:
                target = self._params.get(name)
                if target is None:
                    raise RolloutError(f"weight sync sent {name!r}, which the rollout model does not have")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise RolloutError(f"weight sync: {name} has shape {tuple(tensor.shape)}, engine expects "
                                       f"{tuple(target.shape)}")
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                seen.add(name)
        missing = set(self._params) - seen - ({"lm_head.weight"} if tied else set())
        if missing:
            raise RolloutError(f"weight sync did not send {sorted(missing)[:5]} ({len(missing)} missing)")
        self.weight_version = version
        logger.debug("hf engine: weights v%d loaded in %.2fs", version, time.perf_counter() - start)

    def release_memory(self, tags=None) -> None:  # the in-process engine keeps its (small) model resident
        pass

    def resume_memory(self, tags=None) -> None:
        pass

    def health(self) -> dict:
        return {"engine": "hf", "device": str(self.device), "weight_version": self.weight_version}

    def shutdown(self) -> None:
        pass

    @torch.no_grad()
    def logprobs(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], temperature: float = 1.0
                 ) -> list[list[float]]:
        """Log-probs of each sequence's tokens after its prompt (for checks and diagnostics)."""
        out = []
        for seq, p in zip(sequences, prompt_lens):
            ids = torch.tensor([list(seq)], device=self.device)
            logits = self.model(input_ids=ids).logits[0, :-1].float() / temperature
            lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
            out.append(lp[p - 1 :].tolist())
        return out


def _sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampled ids [B], log-prob of each under softmax(logits / T)).

    Inverse-CDF sampling (one uniform per row, cumsum, searchsorted): exact and several
    times faster than torch.multinomial over a 151,936-entry vocabulary on a CPU.
    """
    z = logits if params.temperature == 1.0 else logits / params.temperature
    if params.top_p < 1.0 or params.top_k > 0:
        probs = _truncate(torch.log_softmax(z, dim=-1), params.top_p, params.top_k).exp()
    else:
        probs = torch.softmax(z, dim=-1)
    cdf = torch.cumsum(probs, dim=-1, out=probs)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all()):
        raise RolloutError("the rollout model produced NaN/inf logits (diverged weights?)")
    u = torch.rand((z.shape[0], 1), generator=generator, device=z.device) * total
    token = torch.searchsorted(cdf, u).clamp(max=z.shape[-1] - 1)[:, 0]
    # the log-prob under the untruncated softmax(z), from the logits themselves (exact)
    picked = z.gather(1, token[:, None])[:, 0]
    return token, picked - torch.logsumexp(z, dim=-1)


def _truncate(logp: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Sampling distribution after top-k / top-p (tokens outside get -inf)."""
    if top_k and top_k > 0 and top_k < logp.shape[-1]:
        kth = logp.topk(top_k, dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = logp.sort(dim=-1, descending=True)
        cum = sorted_lp.exp().cumsum(-1)
        drop = cum - sorted_lp.exp() > top_p  # keep the smallest prefix with mass >= top_p
        logp = logp.scatter(1, order, sorted_lp.masked_fill(drop, float("-inf")))
    return logp


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
