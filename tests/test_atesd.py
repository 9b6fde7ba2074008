"""ATESD: exposure prefixes, the Beta-policy controller (toy bandit, checkpoint round trip)."""

import json

import pytest
import torch

from megatron_rlrt.algorithms import TeacherConfig, build_teacher_views
from megatron_rlrt.algorithms.atesd import (
    SWEEP_RHOS,
    AdaptiveExposure,
    AtesdConfig,
    AtesdController,
    FixedExposure,
    expose_contexts,
    expose_prefix,
    expose_prefix_ids,
    exposed_token_count,
    parse_teacher_exposure,
)


@pytest.fixture(scope="module")
def tok():
    from megatron_rlrt.tokenizer import load_tokenizer

    return load_tokenizer()


SOLUTION = "Let x be the number. Then 2x + 3 = 11, so 2x = 8 and x = 4. The answer is \\boxed{4}."


def test_exposed_token_count_and_ids():
    assert [exposed_token_count(10, r) for r in SWEEP_RHOS] == [0, 2, 5, 7, 10]
    assert exposed_token_count(3, 1 / 3) == 1  # floor(rho n), robust to 1/3 * 3 = 0.999..
    assert expose_prefix_ids([5, 6, 7, 8], 0.5) == [5, 6]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        exposed_token_count(4, 1.5)


def test_expose_prefix_is_a_token_prefix(tok):
    ids = tok(SOLUTION, add_special_tokens=False)["input_ids"]
    assert expose_prefix(tok, SOLUTION, 1.0) is SOLUTION
    assert expose_prefix(tok, SOLUTION, 0.0) == ""
    half = expose_prefix(tok, SOLUTION, 0.5)
    assert half == tok.decode(ids[: len(ids) // 2]) and SOLUTION.startswith(half) and 0 < len(half) < len(SOLUTION)
    assert expose_contexts(tok, [SOLUTION, None], 0.25) == [tok.decode(ids[: len(ids) // 4]), None]


def _views(tok, refs, **kw):
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    return build_teacher_views("opsd", tok, ["What is x if 2x + 3 = 11?", "Compute 3 + 4."], ["r0", "r1", "r2", "r3"],
                               rewards, 2, TeacherConfig(), enable_thinking=True, reference_solutions=refs, **kw)


def test_full_exposure_is_todays_teacher_view_exactly(tok):
    refs = [SOLUTION, "3 + 4 = 7, so the answer is \\boxed{7}."]
    today = _views(tok, refs)
    for full in (_views(tok, expose_contexts(tok, refs, 1.0)), _views(tok, refs, exposure=1.0)):
        assert full.prompt_ids == today.prompt_ids and full.has_teacher.tolist() == today.has_teacher.tolist()
    assert _views(tok, refs, exposure=0.5).prompt_ids == _views(tok, expose_contexts(tok, refs, 0.5)).prompt_ids
    # a partial exposure shows the teacher exactly the token prefix, and nothing after it
    half = _views(tok, expose_contexts(tok, refs, 0.5))
    for i in range(4):
        text = tok.decode(half.prompt_ids[i])
        assert expose_prefix(tok, refs[i // 2], 0.5) in text and refs[i // 2] not in text
        assert len(half.prompt_ids[i]) < len(today.prompt_ids[i])


def _bandit(best, horizon, gamma, decisions=300, seed=0):
    """Learning progress of a window = -(rho - best)^2 + noise: the best rho is known."""
    noise = torch.Generator().manual_seed(seed + 1)
    exposure = AdaptiveExposure(AtesdConfig(hold_window=2, discount=gamma, lr=0.05, horizon=horizon, seed=seed))
    metric = 0.0
    stats = dict(reward=0.3, loss=1.0, entropy=0.5, mismatch=0.1, step_fraction=0.0)
    for update in range(2 * decisions):
        stats["step_fraction"] = update / (2 * decisions)
        rho = exposure.rho_for_update(update, stats, metric)
        metric += 0.5 * (-((rho - best) ** 2) + 0.02 * float(torch.randn((), generator=noise)))
    return exposure.controller.last


@pytest.mark.parametrize("best,horizon,gamma", [(0.2, 1, 0.9), (0.8, 3, 0.9)])
def test_controller_finds_the_best_exposure_on_a_toy_bandit(best, horizon, gamma):
    first = AtesdController(AtesdConfig())
    first.decide(dict(reward=0, loss=0, entropy=0, mismatch=0, step_fraction=0))
    assert first.last["beta_mean"] == pytest.approx(0.5)  # starts uninformed: Beta(2, 2)
    last = _bandit(best, horizon, gamma)
    assert abs(last["beta_mean"] - best) < 0.1, last
    assert last["beta_a"] + last["beta_b"] > 6  # and it got confident, not just lucky on the mean


def _drive(exposure, updates, start=0):
    rhos = []
    for u in range(start, start + updates):
        stats = dict(reward=0.1 * (u % 3), loss=1.0 / (u + 1), entropy=0.5, mismatch=0.02 * u, step_fraction=u / 40)
        rhos.append(exposure.rho_for_update(u, stats, metric=0.05 * u - 0.001 * u * u))
    return rhos


def test_controller_state_round_trip_resumes_exactly():
    cfg = AtesdConfig(hold_window=2, horizon=2, lr=0.1, seed=3)
    a = AdaptiveExposure(cfg)
    _drive(a, 12)
    b = AdaptiveExposure(cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # the trainer's state file is JSON
    assert _drive(a, 14, start=12) == _drive(b, 14, start=12)
    for pa, pb in zip(a.controller.policy.parameters(), b.controller.policy.parameters()):
        assert torch.equal(pa, pb)
    assert a.metrics() == b.metrics() and a.controller.decisions == 13
    other = AdaptiveExposure(AtesdConfig(hold_window=3))
    with pytest.raises(ValueError, match="hold_window"):
        other.load_state_dict(a.state_dict())


def test_parse_teacher_exposure():
    fixed = parse_teacher_exposure("fixed:0.25")
    assert isinstance(fixed, FixedExposure) and fixed.rho_for_update(7, {}, 0.0) == 0.25
    assert isinstance(parse_teacher_exposure("atesd", AtesdConfig(hold_window=4)), AdaptiveExposure)
    for bad in ("fixed:1.5", "fixed:x", "adaptive"):
        with pytest.raises(ValueError, match="--teacher-exposure"):
            parse_teacher_exposure(bad)
    with pytest.raises(ValueError, match="--atesd-discount"):
        AtesdConfig(discount=1.5)
    with pytest.raises(ValueError, match="missing"):
        AtesdController(AtesdConfig()).decide({"reward": 1.0})
