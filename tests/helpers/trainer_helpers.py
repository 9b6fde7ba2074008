"""Per-rank functions for trainer tests (importable by spawned ranks) and a test verifier."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from megatron_rlrt.reward.testing import HashParityVerifier


def assert_resumed_steps_equal(straight: dict, resumed: dict, steps=(3, 4)) -> int:
    """Every float metric of ``steps`` (timings aside) of a resumed run equals the straight run's;
    returns how many were compared, so a caller can check the comparison was not empty."""
    import pytest

    compared = 0
    for step in steps:
        for key, value in straight[step].items():
            if key.startswith("perf/") or "time" in key or not isinstance(value, float):
                continue
            assert resumed[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
            compared += 1
    return compared


def register_test_rewards() -> None:
    from megatron_rlrt.reward.registry import _REGISTERED, register_reward

    if "hash_parity" not in _REGISTERED:
        register_reward("hash_parity", HashParityVerifier)


def train_rank(argv: list[str], out_path: str | None = None) -> None:
    """Run the trainer with ``argv`` on this rank; rank 0 writes its per-step metrics."""
    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.trainer.trainer import Trainer

    register_test_rewards()
    trainer = Trainer(parse_config(argv))
    try:
        history = trainer.train()
    finally:
        trainer.close()
    if out_path and dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(history, f)
    parallel.destroy()


def interrupted_rank(argv: list[str], steps: int) -> None:
    """The training loop of ``Trainer.train`` for the first ``steps`` steps, a checkpoint, and
    an exit: a run killed after that checkpoint."""
    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.trainer.trainer import Trainer

    register_test_rewards()
    trainer = Trainer(parse_config(argv))
    try:
        for step in range(steps):
            trainer.metrics_writer.write(step + 1, trainer.step(step))
        trainer.save(steps)
    finally:
        trainer.close()
    parallel.destroy()


def methods_rank(base_argv: list[str], methods: list[str], out_path: str) -> None:
    """Two RL steps of every method in one process group; rank 0 records the last metrics."""
    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.trainer.trainer import Trainer

    register_test_rewards()
    results = {}
    for method in methods:
        cfg = parse_config(base_argv + ["--advantage-estimator", method])
        trainer = Trainer(cfg)
        try:
            metrics = [trainer.step(s) for s in range(cfg.train_iters)]
            params = [p.detach().clone() for c in trainer.chunks for p in c.parameters()]
        finally:
            trainer.close()
        if dist.get_rank() == 0:
            results[method] = {"metrics": metrics, "finite_params": all(bool(torch.isfinite(p).all()) for p in params)}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, default=float)
    parallel.destroy()


def weight_sync_rank(argv: list[str], out_path: str) -> None:
    """After a training step, the engine (synced by the trainer) and Megatron give the same logits."""
    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.models.forward import forward_logits
    from megatron_rlrt.trainer.trainer import Trainer

    register_test_rewards()
    trainer = Trainer(parse_config(argv))
    try:
        before = None
        if dist.get_rank() == 0:
            before = {n: p.detach().clone() for n, p in trainer.services.engine.model.named_parameters()}
        trainer.step(0)  # updates the policy and syncs it into the engine
        for c in trainer.chunks:
            c.eval()
        tokens = torch.randint(0, 151_000, (2, 11), generator=torch.Generator().manual_seed(5))
        logits = forward_logits(trainer.chunks, tokens)
        result = {}
        if logits is not None and trainer.ps.get_tensor_model_parallel_rank() == 0:
            holder = [logits]
        else:
            holder = [None]
        # move the last stage's logits to rank 0, where the engine lives
        src = dist.get_world_size() - 1 if trainer.ps.get_pipeline_model_parallel_world_size() > 1 else 0
        dist.broadcast_object_list(holder, src=src)
        if dist.get_rank() == 0:
            with torch.no_grad():
                ref = trainer.services.engine.model(tokens).logits.float()
            changed = max((p - before[n]).abs().max().item() for n, p in trainer.services.engine.model.named_parameters())
            result = {"max_abs_diff": (holder[0] - ref).abs().max().item(), "engine_changed": changed,
                      "version": trainer.services.engine.weight_version}
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        trainer.close()
    parallel.destroy()


def teacher_logprobs_rank(argv: list[str], out_path: str) -> None:
    """Teacher log-probs from the packed student+teacher forward vs a teacher-only forward."""
    from dataclasses import replace

    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.trainer.model_step import collect
    from megatron_rlrt.trainer.trainer import Trainer

    register_test_rewards()
    trainer = Trainer(parse_config(argv))
    try:
        batch = trainer.make_batch()
        samples = batch.samples
        packed = collect(trainer.chunks, samples, trainer.opts, 4, None)
        # the same teacher sequences, run as ordinary rows of their own (no student rows beside them)
        alone = collect(trainer.chunks, [replace(s, prompt_ids=s.teacher_prompt_ids, teacher_prompt_ids=None)
                                         for s in samples if s.has_teacher], trainer.opts, 1, None)
        if trainer.is_last_stage and trainer.ps.get_tensor_model_parallel_rank() == 0:
            keys = sorted(packed.teacher_logprobs)
            diff = max((packed.teacher_logprobs[k] - alone.student_logprobs[k]).abs().max().item() for k in keys)
            result = {"teachers": len(keys), "max_abs_diff": diff,
                      "with_teacher": sum(s.has_teacher for s in samples),
                      "student_teacher_differ": max((packed.teacher_logprobs[k] - packed.student_logprobs[k])
                                                    .abs().max().item() for k in keys)}
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        trainer.close()
    parallel.destroy()


def frozen_teacher_rank(argv: list[str], out_path: str) -> None:
    """--teacher-weights initial with a top-K distillation method: before any update the
    separate teacher pass equals the packed current-policy teacher pass (same weights, other
    path); after an update the teacher's values stay those of the starting weights."""
    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.trainer.model_step import collect
    from megatron_rlrt.trainer.trainer import Trainer

    register_test_rewards()
    trainer = Trainer(parse_config(argv))
    try:
        batch = trainer.make_batch()
        samples = batch.samples
        frozen = trainer.score(samples)  # the swapped-in starting weights
        packed = collect(trainer.chunks, samples, trainer.opts, 4, None)  # teacher rows beside the students
        trainer.step(0)
        later = trainer.score(samples)
        packed_later = collect(trainer.chunks, samples, trainer.opts, 4, None)
        if trainer.is_last_stage and trainer.ps.get_tensor_model_parallel_rank() == 0:
            keys = sorted(packed.teacher_logprobs)

            def diff(a, b, ks):
                return max((a[k] - b[k]).abs().max().item() for k in ks)

            result = {"teachers": len(keys), "keys_equal": sorted(frozen.teacher_logprobs) == keys,
                      "ids_equal": all(torch.equal(frozen.student_topk_ids[k], packed.student_topk_ids[k])
                                       for k in frozen.student_topk_ids),
                      "topk_vs_packed": diff(frozen.teacher_topk_logprobs, packed.teacher_topk_logprobs, keys),
                      "lp_vs_packed": diff(frozen.teacher_logprobs, packed.teacher_logprobs, keys),
                      "later_lp_vs_start": diff(later.teacher_logprobs, frozen.teacher_logprobs, keys),
                      "current_moved": diff(packed_later.teacher_logprobs, packed.teacher_logprobs, keys)}
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        trainer.close()
    parallel.destroy()


class FlakyEngine:
    """Test engine: the embedded HF engine that raises on its ``fail_on``-th generate call."""

    def __init__(self, inner, fail_on: int):
        self.inner, self.fail_on, self.calls = inner, fail_on, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, n, params):
        from megatron_rlrt.rollout.base import RolloutError

        self.calls += 1
        if self.calls == self.fail_on:
            raise RolloutError("engine died (test)")
        return self.inner.generate(prompts, n, params)


def register_flaky_engine(fail_on: int) -> None:
    from megatron_rlrt.rollout import registry

    def factory(cfg, hf_dir, tokenizer):
        return FlakyEngine(registry.ENGINES["hf"](cfg, hf_dir, tokenizer), fail_on)

    registry.register_engine("flaky", factory)


def failing_train_rank(argv: list[str], fail_on: int, out_path: str) -> None:
    """Train with an engine that dies on its ``fail_on``-th rollout; record what each rank saw."""
    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.trainer.trainer import Trainer

    register_test_rewards()
    register_flaky_engine(fail_on)
    cfg = parse_config(argv)
    cfg.rollout_engine = "flaky"
    error = None
    try:
        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
    except Exception as exc:  # every rank must see the failure, none may hang
        error = f"{type(exc).__name__}: {exc}"
    with open(f"{out_path}.{dist.get_rank()}", "w") as f:
        json.dump({"error": error}, f)
    parallel.destroy(barrier=False)


def server_engine_rank(argv: list[str], out_path: str) -> None:
    """A few RL steps against an already running rollout server (--rollout-urls in argv)."""
    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.trainer.trainer import Trainer

    register_test_rewards()
    trainer = Trainer(parse_config(argv))
    try:
        steps = [trainer.step(s) for s in range(trainer.cfg.train_iters)]
        version = trainer.services.engine.weight_version if dist.get_rank() == 0 else None
    finally:
        trainer.close()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"steps": steps, "version": version}, f)
    parallel.destroy()


def reference_rank(argv: list[str], out_path: str, reference_hf: str | None = None) -> None:
    """--kl-coef > 0: the reference swapped into the model gives the starting model's logits (or,
    with ``reference_hf``, the logits Hugging Face transformers computes for that model), and
    swapping back gives the trained model's logits bit for bit."""
    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.models.forward import forward_logits
    from megatron_rlrt.trainer.trainer import Trainer

    register_test_rewards()
    trainer = Trainer(parse_config(argv))
    tokens = torch.randint(0, 151_000, (2, 11), generator=torch.Generator().manual_seed(5))

    def logits():
        for c in trainer.chunks:
            c.eval()
        out = forward_logits(trainer.chunks, tokens)
        for c in trainer.chunks:
            c.train()
        return out

    try:
        start = logits()
        expected = start
        if reference_hf is not None:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(reference_hf, dtype=torch.float32).eval()
            with torch.no_grad():
                expected = hf(tokens).logits
        steps = [trainer.step(s) for s in range(trainer.cfg.train_iters)]
        trained = logits()
        with trainer.reference.swapped_in(trainer.chunks):
            ref = logits()
        back = logits()
        if dist.get_rank() == 0:
            with open(out_path, "w") as f:
                json.dump({"steps": steps, "ref_vs_expected": (ref - expected).abs().max().item(),
                           "trained_vs_start": (trained - start).abs().max().item(),
                           "expected_vs_start": (expected - start).abs().max().item(),
                           "back_vs_trained": (back - trained).abs().max().item()}, f)
    finally:
        trainer.close()
    parallel.destroy()


def ema_teacher_rank(argv: list[str], rate: float, out_path: str) -> None:
    """Resume a finished --teacher-weights ema run of 2 steps (checkpoints iter 1 and 2 kept):
    the restored teacher must be (1-r)^2 theta_0 + r(1-r) theta_1 + r theta_2."""
    import os

    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.models.hf_checkpoint import load_hf_weights
    from megatron_rlrt.models.megatron_checkpoint import load_hf_into_model
    from megatron_rlrt.trainer import checkpoint as ckpt
    from megatron_rlrt.trainer.trainer import Trainer
    from megatron_rlrt.trainer.weight_snapshot import WeightSnapshot

    register_test_rewards()
    cfg = parse_config(argv)
    trainer = Trainer(cfg)
    try:
        root = ckpt.checkpoint_root(cfg.save)
        theta = [WeightSnapshot.load(trainer.chunks, os.path.join(root, ckpt.iter_name(s), "model")) for s in (1, 2)]
        # theta_0: the HF checkpoint the run started from, loaded afresh (the model is not used after)
        load_hf_into_model(trainer.chunks, trainer.arch, load_hf_weights(trainer.hf_dir, trainer.arch))
        theta.insert(0, WeightSnapshot.of(trainer.chunks))
        worst, moved = 0.0, 0.0
        for t, a, b, c in zip(trainer.teacher.tensors, *(s.tensors for s in theta)):
            want = (1 - rate) ** 2 * a + rate * (1 - rate) * b + rate * c
            worst = max(worst, (t - want).abs().max().item())
            moved = max(moved, (t - c).abs().max().item())
        result = {"start_step": trainer.start_step, "max_abs_diff": worst, "teacher_vs_policy": moved}
        if dist.get_rank() == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        trainer.close()
    parallel.destroy()
