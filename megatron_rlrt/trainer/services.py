"""What lives on rank 0 only: data, tokenizer, verifier, rollout engine, evaluation.

``build_rank0_services`` runs on rank 0 (through ``on_rank0``); every other rank holds None
in its place, so code that needs a service says so by where it runs, not by an ``if rank0``
deep inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_rlrt.algorithms import TeacherConfig
from megatron_rlrt.algorithms.atesd import ExposureSchedule, parse_teacher_exposure
from megatron_rlrt.config import Config
from megatron_rlrt.eval.metrics import summarize
from megatron_rlrt.rollout.base import SamplingParams

# --teacher-context -> TeacherConfig.context
_CONTEXT = {"peer": "peer", "reference": "reference_solution", "answer": "reference_answer"}


def on_rank0(fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on rank 0 and broadcast its result; if it raises, every rank raises
    (instead of the other ranks waiting forever in their next collective)."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, on every rank
            error = exc
    holder = [(result, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(holder, src=0)
    if error is not None:
        raise error
    if holder[0][1] is not None:
        raise RuntimeError(f"rank 0 failed while {what}: {holder[0][1]}")
    return holder[0][0]


@dataclass
class Rank0Services:
    cfg: Config
    tokenizer: Any
    loader: Any  # PromptLoader over the training prompts
    eval_prompts: Optional[list]  # held-out prompts (--eval-data), None without
    reward: Any  # a Verifier
    teacher_cfg: TeacherConfig
    peer_generator: torch.Generator  # RLRT's random peer choice
    engine: Any = None  # a RolloutEngine (``attach_engine``)
    fleet: Any = None  # the RolloutFleet the engine belongs to (memory release when colocated)
    eos_ids: list[int] = field(default_factory=list)

    def attach_engine(self, fleet, rng: dict | None) -> None:
        """Take the engine of the rollout fleet (created collectively after these services)."""
        self.fleet, self.engine = fleet, fleet.engine
        if rng and "rollout_generator" in rng and hasattr(self.engine, "generator"):
            self.engine.generator.set_state(rng["rollout_generator"])
        self.eos_ids = list(getattr(self.engine, "eos_token_ids", [self.tokenizer.eos_token_id]))

    def release_engine(self) -> None:
        """After a rollout: colocated servers free their weights and KV cache for training."""
        if self.fleet is not None:
            self.fleet.release()
    exposure: Optional[ExposureSchedule] = None  # --teacher-exposure (methods with a teacher)

    def sampling(self, temperature: float | None = None, seed: int | None = None) -> SamplingParams:
        cfg = self.cfg
        return SamplingParams(max_new_tokens=cfg.rollout_max_response_len,
                              temperature=temperature or cfg.rollout_temperature, top_p=cfg.rollout_top_p,
                              top_k=cfg.rollout_top_k, stop_token_ids=tuple(self.eos_ids), seed=seed)

    def evaluate(self) -> dict:
        """Held-out avg@k / pass@k with the rollout engine (current weights)."""
        if not self.eval_prompts:
            return {}
        cfg = self.cfg
        outs = self.engine.generate([p.prompt_ids for p in self.eval_prompts], cfg.eval_n_samples,
                                    self.sampling(cfg.eval_temperature, seed=cfg.seed + 1))
        flat = [(p, s) for p, group in zip(self.eval_prompts, outs) for s in group]
        scored = self.reward.score([self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for _, s in flat],
                                   [p for p, _ in flat])
        correct = scored.correct
        n = cfg.eval_n_samples
        per_prompt = [correct[i : i + n] for i in range(0, len(correct), n)]
        return {f"eval/{k}": v for k, v in summarize(per_prompt, ks=sorted({1, n})).items()}

    def observe_step(self, metrics: dict) -> None:
        """A finished step's metrics (the statistics the exposure controller reads)."""
        if self.exposure is not None:
            self.exposure.observe(metrics)

    def rng_state(self) -> dict | None:
        """Generator states a checkpoint keeps so that a resumed run samples as an uninterrupted one."""
        if not hasattr(self.engine, "generator"):
            return None
        return {"rollout_generator": self.engine.generator.get_state(), "peer_generator": self.peer_generator.get_state()}

    def close(self) -> None:
        self.reward.close()  # the engine is shut down with its fleet


def build_rank0_services(cfg: Config, hf_dir: str, loader_state: dict | None, rng: dict | None,
                         exposure_state: dict | None = None) -> Rank0Services:
    """Data, tokenizer, verifier, teacher-view settings, generators and the teacher-exposure
    schedule (``exposure_state``: its checkpointed state); the rollout engine is attached after
    the (collective) fleet is up: ``Rank0Services.attach_engine``."""
    from megatron_rlrt.data import DataConfig, PromptDataset, PromptLoader, TemplateConfig
    from megatron_rlrt.reward import get_reward
    from megatron_rlrt.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(hf_dir)
    template = TemplateConfig(apply_chat_template=cfg.apply_chat_template, enable_thinking=cfg.enable_thinking,
                              system_prompt=cfg.system_prompt, instruction=cfg.instruction)
    data_cfg = DataConfig(path=cfg.prompt_data, prompt_key=cfg.input_key, answer_key=cfg.label_key,
                          solution_key=cfg.solution_key, max_prompt_length=cfg.rollout_max_prompt_len,
                          template=template)
    dataset = PromptDataset.from_config(data_cfg, tokenizer)
    if len(dataset) == 0:
        raise ValueError(f"--prompt-data {cfg.prompt_data}: no usable prompts ({dataset.stats})")
    loader = PromptLoader(dataset, seed=cfg.seed)
    if loader_state:
        loader.load_state_dict(loader_state)
    eval_prompts = None
    if cfg.eval_data:
        eval_prompts = list(PromptDataset.from_config(replace(data_cfg, path=cfg.eval_data), tokenizer))
        eval_prompts = eval_prompts[: cfg.eval_max_prompts] if cfg.eval_max_prompts else eval_prompts
    reward = get_reward(cfg.reward, timeout_s=cfg.reward_timeout, num_workers=cfg.reward_workers,
                        progress=cfg.progress)
    teacher_cfg = TeacherConfig(context=_CONTEXT[cfg.resolved_teacher_context()],
                                peer_choice=cfg.teacher_peer_choice, strip_thinking=cfg.teacher_strip_thinking,
                                max_teacher_prompt_len=cfg.teacher_max_prompt_len)
    peer_generator = torch.Generator().manual_seed(cfg.seed + 17)
    if rng and "peer_generator" in rng:
        peer_generator.set_state(rng["peer_generator"])
    from megatron_rlrt.algorithms import get_method

    exposure = None
    if get_method(cfg.advantage_estimator).needs_teacher:
        exposure = ExposureSchedule(parse_teacher_exposure(cfg.resolved_teacher_exposure(), cfg.atesd_config()),
                                    cfg.train_iters)
        if exposure_state:
            exposure.load_state_dict(exposure_state)
    return Rank0Services(cfg, tokenizer, loader, eval_prompts, reward, teacher_cfg, peer_generator,
                         exposure=exposure)
