"""Long responses on CPU: the log-prob op of the no-grad and training passes never builds
[tokens, vocabulary] logits (fused-linear op on every device)."""

from __future__ import annotations

import pytest
import torch

from megatron_rlrt import ops
from megatron_rlrt.trainer import logprobs as lp_mod
from megatron_rlrt.trainer.logprobs import LogprobRequest, fused_chunk_size, logprob_columns


@pytest.mark.parametrize("with_entropy", [False, True])
def test_cpu_logprob_columns_use_the_fused_linear_op_and_match_full_logits(monkeypatch, with_entropy):
    monkeypatch.setattr(lp_mod, "_tp", lambda: (None, 1, 0))

    def no_logits(*args, **kwargs):
        raise AssertionError("materialised [tokens, vocab/TP] logits on the log-prob path")

    monkeypatch.setattr(ops, "shard_logits", no_logits)  # the logit shard lives in ops/vocab_topk.py
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 1000
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    req = LogprobRequest(torch.arange(n), targets, temperature=0.7, with_entropy=with_entropy)
    cols = logprob_columns(hidden, weight, req)
    upstream = torch.randn(cols.shape, generator=g)
    (cols * upstream).sum().backward()

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logp_all = ((h64 @ w64.t()) / 0.7).log_softmax(-1)
    ref = [logp_all.gather(1, targets[:, None])[:, 0]]
    if with_entropy:
        ref.append(-(logp_all.exp() * logp_all).sum(-1))
    ref = torch.stack(ref, 1)
    torch.testing.assert_close(cols.double(), ref, rtol=0, atol=2e-5)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_fused_tiles_shrink_with_the_token_count():
    assert fused_chunk_size(100) == 4096
    assert fused_chunk_size(40_960) * 40_960 <= lp_mod.FUSED_TILE_ELEMENTS  # ~64 MB fp32 per tile at 2 x 20k
    assert fused_chunk_size(10**9) == 128


def _long_step_argv(model, data, layout, response_len):
    return ["--hf-checkpoint", model, "--prompt-data", data, "--reward", "hash_parity", "--advantage-estimator",
            "rlrt", "--rollout-batch-size", "1", "--n-samples-per-prompt", "2", "--rollout-max-response-len",
            str(response_len), "--train-iters", "1", "--lr", "1e-3", "--lr-warmup-iters", "0", "--no-progress",
            "--no-tensorboard", "--use-dynamic-batch-size", "--max-tokens-per-gpu", "512",
            "--log-probs-max-tokens-per-gpu", "4096", "--seed", "5"] + layout


def run_long_step(model, data, tmp_path, layout, world, lengths, teacher_for_all=False):
    from megatron_rlrt import parallel
    from tests.helpers.dist_helpers_long import long_step_rank

    out = tmp_path / f"step-{'-'.join(layout) or 'cp1'}.pt"
    parallel.spawn(long_step_rank, world, _long_step_argv(model, data, layout, lengths[2]), lengths, str(out),
                   teacher_for_all)
    return torch.load(out, weights_only=False)


LONG_STEP = (13, 21, 301)  # prompt, peer solution, response tokens of the RLRT step tests


@pytest.fixture(scope="module")
def cp1_step(tiny_model, arithmetic_data, tmp_path_factory):
    """The one-rank reference step, run once for every layout compared with it (read-only)."""
    return run_long_step(tiny_model, arithmetic_data, tmp_path_factory.mktemp("cp1"), [], 1, LONG_STEP)


def assert_same_step(a, b, grad_rtol=1e-5, grad_norms_only=False):
    for role in ("student", "teacher"):
        assert sorted(a[role]) == sorted(b[role])
        for i in a[role]:
            x, y = torch.tensor(a[role][i]), torch.tensor(b[role][i])
            assert x.shape == y.shape and (x - y).abs().max() < 1e-5, (role, i, (x - y).abs().max())
    if grad_norms_only:  # TP shards of fused SwiGLU weights concatenate in another order than TP=1
        worst = max(abs(a["grads"][n].norm() - b["grads"][n].norm()).item() / b["grads"][n].norm().clamp_min(1e-30).item()
                    for n in b["grads"])
    else:
        worst = max(((a["grads"][n] - b["grads"][n]).norm() / b["grads"][n].norm().clamp_min(1e-30)).item()
                    for n in b["grads"])
    assert worst < grad_rtol, worst
    for rec in (a, b):  # megatron's reported norm is the float64 norm of the gradients it stepped with
        exact = sum(g.double().square().sum() for g in rec["grads"].values()).sqrt().item()
        assert abs(rec["metrics"]["actor/grad_norm"] / exact - 1) < 1e-6, (rec["metrics"]["actor/grad_norm"], exact)
    assert abs(a["metrics"]["actor/grad_norm"] / b["metrics"]["actor/grad_norm"] - 1) < grad_rtol
    for key in ("loss/pg", "loss/distill", "rlrt/weight_mean"):
        if key in b["metrics"]:
            assert abs(a["metrics"][key] - b["metrics"][key]) <= 1e-5 * max(1.0, abs(b["metrics"][key])), key


@pytest.mark.slow  # spawns ranks
def test_rlrt_step_at_context_parallel_2_equals_cp1(tiny_model, arithmetic_data, tmp_path, cp1_step):
    """The trainer's whole RLRT step on fixed ids (rows of prompt 13 + peer 21 + response 301 tokens,
    longer than one budget of 512 tokens per GPU at CP=1 so samples split over micro-batches):
    CP=2 log-probs equal CP=1's within 1e-5, gradients within 1e-5 relative, same metrics."""
    one = cp1_step
    two = run_long_step(tiny_model, arithmetic_data, tmp_path, ["--context-parallel-size", "2"], 2, LONG_STEP)
    assert one["metrics"]["actor/grad_norm"] > 0 and "rlrt/weight_mean" in one["metrics"]
    assert sorted(one["teacher"]) == [0] and len(one["teacher"][0]) == 301 and len(one["student"][1]) == 301
    assert_same_step(two, one)


@pytest.mark.slow  # spawns ranks
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2cp2", "tp2sp_cp2"])
def test_rlrt_step_at_tp2_cp2_equals_tp1_cp1(tiny_model, arithmetic_data, tmp_path, cp1_step, sequence_parallel):
    """4 ranks, TP=2 x CP=2, with and without sequence parallelism (rows padded to 2 x CP x TP; norms
    on sequence slices, their weight gradients all-reduced over TP): the same step as one rank
    (log-probs 1e-5, per-parameter gradient norms 1e-5 relative, metrics)."""
    one = cp1_step
    layout = ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2"]
    four = run_long_step(tiny_model, arithmetic_data, tmp_path,
                         layout + (["--sequence-parallel"] if sequence_parallel else []), 4, LONG_STEP)
    assert {n: tuple(g.shape) for n, g in four["grads"].items()} == {n: tuple(g.shape) for n, g in one["grads"].items()}
    assert four["sequence_parallel"] is sequence_parallel
    norms = sorted(n for n in one["grads"] if "norm" in n)
    assert len(norms) == 9 and four["sp_marked"] == (norms if sequence_parallel else [])
    assert_same_step(four, one, grad_norms_only=True)


def test_token_budget_gives_an_oversized_row_its_own_microbatch():
    from megatron_rlrt.trainer.model_step import plan_microbatches
    from megatron_rlrt.trainer.rollout_batch import Sample

    def sample(i, prompt, response, teacher=None):
        return Sample(i, 0, [1] * prompt, [2] * response, [-1.0] * response, 1.0, True, 1.0,
                      None if teacher is None else [3] * teacher)

    samples = [sample(0, 10, 900, teacher=50), sample(1, 10, 100), sample(2, 10, 80, teacher=20)]
    plan = plan_microbatches(samples, True, 1, max_tokens=512)
    sizes = sorted(sum(len(r) for r in mb) for mb in plan)
    # both 900-token rows (student 910, teacher 950) alone, never truncated; the rest packed by budget
    assert [len(mb) for mb in plan if sum(len(r) for r in mb) > 512] == [1, 1]
    assert sorted(len(r) for mb in plan for r in mb) == sorted([910, 950, 110, 90, 100])
    assert sizes == [300, 910, 950]
    # deterministic: every pipeline stage (same samples) plans the same micro-batches
    assert plan_microbatches(samples, True, 1, max_tokens=512) == plan
    # with CP=2 a micro-batch holds 2 x the per-GPU budget: the whole first sample fits together
    cp2 = plan_microbatches(samples, True, 1, max_tokens=1024, cp_size=2)
    assert any(sorted(len(r) for r in mb)[-2:] == [910, 950] for mb in cp2)


@pytest.mark.slow  # spawns ranks
def test_trainer_cli_first_step_at_cp2_equals_cp1(tiny_model, arithmetic_data, tmp_path):
    """The trainer as launched (HF rollouts, verifier, RLRT teacher views), same seed: the first two
    steps' losses and metrics at --context-parallel-size 2, and at TP=2 x CP=2 (4 ranks), equal CP=1's
    (1e-4 relative: step 2's rollouts come from weights updated by each run)."""
    import json

    from megatron_rlrt import parallel
    from tests.helpers.trainer_helpers import train_rank

    base = ["--hf-checkpoint", tiny_model, "--prompt-data", arithmetic_data, "--reward", "hash_parity",
            "--advantage-estimator", "rlrt", "--rollout-batch-size", "2", "--n-samples-per-prompt", "4",
            "--rollout-max-response-len", "6", "--train-iters", "2", "--lr", "1e-3", "--lr-warmup-iters", "0",
            "--no-progress", "--no-tensorboard", "--enable-thinking", "--teacher-max-prompt-len", "512", "--seed", "7"]
    runs = {}
    layouts = (("cp1", [], 1), ("cp2", ["--context-parallel-size", "2"], 2),
               ("tp2cp2", ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2"], 4))
    for name, extra, world in layouts:
        parallel.spawn(train_rank, world, base + extra + ["--save", str(tmp_path / name)])
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = {r["step"]: r for r in map(json.loads, lines) if r["step"] in (1, 2)}
    assert sum(runs["cp1"][s]["rlrt/teacher_built"] for s in (1, 2)) > 0
    compared = 0
    for other in ("cp2", "tp2cp2"):
        for step in (1, 2):  # step 2 also checks that the CP=2 update moved the weights like CP=1's
            one, two = runs["cp1"][step], runs[other][step]
            assert one["actor/grad_norm"] > 0
            for key, value in one.items():
                if key.endswith("_s"):  # wall-clock timings (reward/score_time_s) differ with machine load
                    continue
                if key.startswith(("loss/", "actor/", "rlrt/", "reward/", "response/")) and isinstance(value, float):
                    assert abs(two[key] - value) <= 1e-4 * max(1.0, abs(value)), (other, step, key, value, two[key])
                    compared += 1
    assert compared > 40


def test_cp_split_puts_teacher_tokens_on_another_rank_than_their_student_source(monkeypatch):
    """Why distillation under CP needs the gathered columns: with zigzag chunks, the student position
    a teacher position reads its top-K ids from often sits on the other CP rank."""
    from megatron_rlrt.packing import PackRow
    from megatron_rlrt.trainer import model_step

    rows = [PackRow([1] * 13, [2] * 61, "student", 0), PackRow([1] * 34, [2] * 61, "teacher", 0)]
    owner = {}
    for rank in (0, 1):
        monkeypatch.setattr(model_step, "cp_size_rank", lambda rank=rank: (2, rank))
        mb = model_step.build_microbatch(rows, model_step.StepOptions(topk=4))
        owner.update({int(c): rank for c in mb.cp.slots})
        src = mb.teacher_src
    teacher_cols = (src >= 0).nonzero()[:, 0].tolist()
    assert len(teacher_cols) == 61 and sorted(owner) == list(range(len(src)))
    crossing = sum(owner[c] != owner[int(src[c])] for c in teacher_cols)
    assert 0 < crossing < 61


@pytest.mark.slow  # spawns ranks
@pytest.mark.parametrize("method", [["sdpo"], ["srpo", "--teacher-weights", "initial"]], ids=["sdpo", "srpo_frozen"])
def test_distillation_step_at_cp2_equals_cp1(tiny_model, arithmetic_data, tmp_path, method):
    """Top-K distillation as a whole trainer step, teacher rows for both samples. sdpo: the
    current-policy teacher shares the student's pass and is scored at the policy's top-K ids of the
    matching student position, which may sit on the other CP rank; srpo with a frozen teacher: a
    separate teacher pass scored at the given ids, and the routed loss. CP=2 picks the same top-K ids
    as CP=1, and its log-probs, teacher top-K log-probs (1e-5), gradients (1e-5 relative) and
    distillation loss equal CP=1's (the loss, a JSD of two nearly equal distributions, is ~1e-7
    here: compared on assert_same_step's absolute scale; the gradients carry the relative check)."""
    lengths = (13, 21, 61)
    method = ["--advantage-estimator", *method, "--distill-topk", "8"]
    one = run_long_step(tiny_model, arithmetic_data, tmp_path, method, 1, lengths, teacher_for_all=True)
    two = run_long_step(tiny_model, arithmetic_data, tmp_path, method + ["--context-parallel-size", "2"], 2,
                        lengths, teacher_for_all=True)
    assert sorted(one["teacher"]) == [0, 1] and one["metrics"]["loss/distill"] != 0
    assert_same_step(two, one)
    for i in (0, 1):
        assert two["student_topk_ids"][i] == one["student_topk_ids"][i]
        x, y = torch.tensor(two["teacher_topk"][i]), torch.tensor(one["teacher_topk"][i])
        assert x.shape == (61, 8) and (x - y).abs().max() < 1e-5
