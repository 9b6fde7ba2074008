"""CPU checks of GPU-only decisions (docs/gpu_audit.md), by injecting what a GPU machine reports:
which GPU a rank takes, and that the trainer's per-micro-batch host copies are one per micro-batch
(each .cpu()/.item()/.tolist() of a CUDA tensor is a device sync)."""

from __future__ import annotations

import pytest
import torch

from megatron_rlrt import platform


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    assert platform.local_gpu_index(3, 8) == 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(platform, "has_transformer_engine", lambda: False)
    found = platform.detect()
    assert found.device == torch.device("cuda", 1) and found.backend == "nccl"


def test_more_ranks_than_gpus_is_refused_not_wrapped(monkeypatch):
    # LOCAL_RANK 2 on a 2-GPU node used to wrap onto GPU 0 (NCCL: "Duplicate GPU detected" later)
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=2 but this process sees 2 GPU\(s\).*--nproc-per-node <= 2"):
        platform.local_gpu_index(2, 2)
    monkeypatch.setenv("LOCAL_RANK", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=4"):
        platform.detect()


class _HostCopies:
    """Counts device->host copies of tensors (what syncs a GPU): Tensor.cpu/.item/.tolist."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("cpu", "item", "tolist"):
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **k):
                self.count += 1
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def _loss_case(method: str):
    from tests.helpers.loss_case import packed_loss_case

    case = packed_loss_case(method)
    return case.mb, case.cols, case.inputs, case.spec, case.config


@pytest.mark.parametrize("method", ["grpo", "sdpo"])
def test_rl_loss_scalars_reach_the_host_in_one_copy(monkeypatch, method):
    """rl_loss's metrics (token count, normaliser, pg/distill loss, every policy metric) come to
    the host in one copy per micro-batch; their values are exactly the per-scalar .item() ones
    (tests/test_trainer_data.py checks the loss and metrics against a hand computation)."""
    from megatron_rlrt.trainer.loss import rl_loss

    mb, cols, inputs, spec, config = _loss_case(method)
    copies = _HostCopies(monkeypatch)
    loss, count, metrics = rl_loss(mb, cols, inputs, spec, config)
    n = copies.count
    monkeypatch.undo()
    # the scalars' one stack().tolist(), plus the micro-batch's row ids (.tolist() of a CPU index)
    assert n <= 2, n
    assert metrics.sums == _metrics_one_item_at_a_time(mb, cols, inputs, spec, config)


def _metrics_one_item_at_a_time(mb, cols, inputs, spec, config) -> dict:
    """rl_loss's metrics as it computed them before: one .item() per scalar."""
    from megatron_rlrt.algorithms import loss_token_mask, policy_token_loss, total_loss
    from megatron_rlrt.algorithms import distillation_token_loss
    from megatron_rlrt.trainer.loss import _pad_rows, padded
    from megatron_rlrt.trainer.logprobs import ColumnLayout
    from megatron_rlrt.trainer.metrics import MetricSums
    from megatron_rlrt.trainer.model_step import student_values

    values, mask = student_values(mb, cols)
    layout = ColumnLayout.of(mb.request)
    rows = [inputs[i] for i in mb.packed.student_sample_index.tolist()]
    width = mask.shape[1]
    stack = lambda f: padded([getattr(r, f) for r in rows], width)  # noqa: E731
    rewards = torch.stack([r.reward for r in rows])
    has_teacher = torch.tensor([r.has_teacher for r in rows])
    policy = policy_token_loss(values[..., layout.logprob], stack("old_logprobs"), stack("advantages"), mask,
                               config.policy, entropy=values[..., layout.entropy],
                               rollout_logprobs=stack("rollout_logprobs") if config.policy.tis_cap is not None else None)
    distill = None
    if spec.uses_distillation:
        teacher = torch.stack([_pad_rows(r.teacher_topk_logprobs, width, layout.topk) for r in rows])
        distill = distillation_token_loss(values[..., layout.topk_logprobs], teacher, alpha=config.distill_alpha,
                                          entropy_beta=config.distill_entropy_beta)
    _, parts = total_loss(spec.name, mask, rewards, pg_token_loss=None if spec.loss == "distill" else policy.pg,
                          distill_token_loss=distill, has_teacher=has_teacher, regularizer_token_loss=policy.regularizer,
                          distill_coef=config.distill_coef, agg_mode=config.policy.agg_mode, global_num_tokens=1.0,
                          global_num_seqs=1.0)
    count = loss_token_mask(spec.name, mask, rewards, has_teacher).sum().to(torch.int)
    out, num_tokens = MetricSums(), float(mask.sum())
    for name, v in policy.metrics.items():
        if name != "num_tokens":
            key = f"loss/{name}" if name.startswith("pg_") else f"actor/{name}"
            out.add(key, v.item()) if name.endswith("_max") else out.add(key, v.item() * num_tokens, num_tokens)
    out.add("loss/pg", parts.get("pg_loss", torch.zeros(())).item(), float(count))
    if "distill_loss" in parts:
        out.add("loss/distill", parts["distill_loss"].item(), float(count))
    return out.sums
