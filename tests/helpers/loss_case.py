"""One packed micro-batch of two samples with random log-prob columns and per-sample loss inputs:
what the RL-loss tests feed ``trainer.loss.rl_loss`` (test_trainer_data.py against the algorithm
functions, test_gpu_paths.py for its host copies)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossCase:
    samples: list
    mb: object  # model_step.MicroBatch
    cols: torch.Tensor  # [label positions, layout width], requires grad
    inputs: dict  # sample index -> loss.SampleInputs
    spec: object  # algorithms.MethodSpec
    config: object  # loss.RLLossConfig
    topk: int  # distillation top-K (0 for policy-gradient methods)


def packed_loss_case(method: str, seed: int = 1) -> LossCase:
    """Samples of 3 and 2 response tokens (one correct), entropy and (distillation methods) K=3
    top-K columns, distill_coef 0.7; everything drawn from one seeded generator."""
    from megatron_rlrt.algorithms import PolicyLossConfig, get_method
    from megatron_rlrt.platform import setup_megatron

    setup_megatron()  # megatron-core imports (parallel_state) need the CPU adaptation first
    from megatron_rlrt.trainer.loss import RLLossConfig, SampleInputs
    from megatron_rlrt.trainer.model_step import StepOptions, build_microbatch, plan_microbatches
    from megatron_rlrt.trainer.rollout_batch import Sample

    spec = get_method(method)
    k = 3 if spec.uses_distillation else 0
    g = torch.Generator().manual_seed(seed)
    samples = [Sample(0, 0, [1, 2], [3, 4, 5], [-1.0] * 3, 1.0, True, 0.5),
               Sample(1, 0, [1, 2, 6], [7, 8], [-1.0] * 2, 0.0, False, -0.5)]
    topk_ids = {s.index: torch.randint(0, 50, (len(s.response_ids), k), generator=g) for s in samples} if k else None
    (rows,) = plan_microbatches(samples, False, 2, None)
    mb = build_microbatch(rows, StepOptions(with_entropy=True, topk=k), topk_ids)
    n = len(mb.request.positions)
    cols = torch.cat([-torch.rand(n, 1, generator=g), torch.rand(n, 1, generator=g),
                      torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.1], 1).requires_grad_()
    inputs = {s.index: SampleInputs(torch.full((len(s.response_ids),), s.advantage), torch.tensor(s.rollout_logprobs),
                                    torch.tensor(float(s.correct)), True,
                                    old_logprobs=-torch.rand(len(s.response_ids), generator=g),
                                    topk_ids=topk_ids[s.index] if k else None,
                                    teacher_topk_logprobs=torch.log_softmax(torch.randn(len(s.response_ids), k,
                                                                                        generator=g), -1) if k else None)
              for s in samples}
    return LossCase(samples, mb, cols, inputs, spec, RLLossConfig(PolicyLossConfig(), distill_coef=0.7), k)
