"""math verifier through the real process pool: equivalences, timeouts, crashes, stats."""

import time

import pytest

from megatron_rlrt.reward import RewardStats, ScoringPool, get_reward, list_rewards, register_reward
from megatron_rlrt.reward.base import RewardBatch, RewardResult, Verifier
from megatron_rlrt.reward.testing import crash_on_marker, crash_once_on_marker, hang_on_marker


@pytest.fixture(scope="module")
def pool():
    p = ScoringPool(num_workers=2)
    yield p
    p.close()


@pytest.fixture(scope="module")
def math_reward(pool):
    # generous: under a loaded CI machine a first sympy parse can take seconds; timeouts have their own tests
    return get_reward("math", timeout_s=30, pool=pool)


@pytest.mark.parametrize(
    "response, gold, reward, reason",
    [
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0, "correct"),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0, "correct"),
        (r"\boxed{\dfrac{3}{6}}", "1/2", 1.0, "correct"),
        (r"\boxed{079}", "79", 1.0, "correct"),  # AIME style
        (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0, "correct"),
        (r"\boxed{\{1,2\}}", r"\{2, 1\}", 1.0, "correct"),
        ("Answer: 34", "34", 1.0, "correct"),
        (r"\boxed{35}", "34", 0.0, "wrong"),
        (r"\boxed{\frac{1}{3}}", "0.5", 0.0, "wrong"),
        ("I give up", "34", 0.0, "no_boxed"),
        (r"<think>\boxed{34}</think> the end", "34", 0.0, "no_boxed"),
        (r"<think>\boxed{34}", "34", 0.0, "unclosed_think"),
        (r"\boxed{34}", "", 0.0, "bad_gold"),
    ],
)
def test_math_verify_cases(math_reward, response, gold, reward, reason):
    result = math_reward.score([response], [{"answer": gold}]).results[0]
    assert (result.reward, result.reason) == (reward, reason)
    assert result.correct == (reward == 1.0)


def test_batch_stats_and_order(math_reward):
    responses = [r"\boxed{2}", r"\boxed{3}", "nothing", r"\boxed{2}"]
    batch = math_reward.score(responses, [{"answer": "2"}] * 4)
    assert batch.rewards == [1.0, 0.0, 0.0, 1.0]
    assert batch.stats.count == 4 and batch.stats.mean_reward == 0.5
    assert batch.stats.parse_failures == 1 and batch.stats.timeouts == 0
    metrics = batch.stats.to_metrics()
    assert metrics["reward/mean"] == 0.5 and metrics["reward/reason/no_boxed"] == 1.0


def test_samples_may_be_objects(math_reward):
    class S:
        answer = "7"

    assert math_reward.score([r"\boxed{7}"], [S()]).rewards == [1.0]


def test_hanging_verify_times_out_and_batch_returns_in_bound(pool):
    timeout = 5.0  # the ordinary items must finish inside it even on a loaded CI machine
    reward = get_reward("math", timeout_s=timeout, pool=pool, item_fn=hang_on_marker)
    responses = [r"\boxed{HANG}", r"\boxed{2}", r"\boxed{HANG}", r"\boxed{3}"]
    start = time.monotonic()
    batch = reward.score(responses, [{"answer": "2"}] * 4)
    elapsed = time.monotonic() - start
    assert [r.reason for r in batch.results] == ["timeout", "correct", "timeout", "wrong"]
    assert batch.rewards == [0.0, 1.0, 0.0, 0.0]
    assert batch.stats.timeouts == 2 and batch.stats.killed == 2
    # 2 workers, 2 hung items: about one timeout period plus respawn slack; without the
    # outside kill the batch would never return (the bound is loose: CI machines are busy)
    assert elapsed < timeout + 60.0, elapsed
    # the hung workers were replaced: the same pool keeps working, without a pool restart
    assert reward.score([r"\boxed{2}"] * 4, [{"answer": "2"}] * 4).rewards == [1.0] * 4
    assert pool.restarts == 0


def test_batch_deadline_caps_the_whole_batch(pool):
    reward = get_reward("math", timeout_s=60, batch_timeout_s=0.5, pool=pool, item_fn=hang_on_marker)
    start = time.monotonic()
    batch = reward.score([r"\boxed{HANG}", r"\boxed{1}"], [{"answer": "1"}] * 2)
    assert time.monotonic() - start < 30.0  # the 60 s item limit was not waited for
    assert batch.results[0].reason == "timeout"
    assert batch.results[1].reason in ("correct", "timeout")


def test_crashing_worker_is_counted_not_fatal(pool):
    reward = get_reward("math", timeout_s=5, pool=pool, item_fn=crash_on_marker)
    batch = reward.score([r"\boxed{CRASH}", r"\boxed{1}"], [{"answer": "1"}] * 2)
    assert [r.reason for r in batch.results] == ["worker_died", "correct"]
    assert reward.score([r"\boxed{1}"], [{"answer": "1"}]).rewards == [1.0]


def test_worker_death_is_retried_once_in_a_fresh_worker(pool, tmp_path):
    # a one-off death (an OOM kill, a crash of a forked worker) does not cost the item its reward
    reward = get_reward("math", timeout_s=30, pool=pool, item_fn=crash_once_on_marker)
    before = pool.retried
    flag = tmp_path / "died"
    batch = reward.score([r"\boxed{CRASH_ONCE:%s}" % flag, r"\boxed{2}"], [{"answer": "1"}, {"answer": "2"}])
    assert flag.exists()  # the first attempt did kill its worker
    assert [r.reason for r in batch.results] == ["correct", "correct"]
    assert pool.retried == before + 1


def test_pool_is_lazy_reusable_and_closes():
    reward = get_reward("math", timeout_s=5, num_workers=1)
    assert not reward.pool.started  # nothing started until the first batch
    assert reward.score([r"\boxed{1}"], [{"answer": "1"}]).rewards == [1.0]
    assert reward.pool.started
    reward.close()
    assert not reward.pool.started
    assert reward.score([r"\boxed{1}"], [{"answer": "1"}]).rewards == [1.0]  # restarts lazily
    reward.close()


def test_registry():
    assert {"math", "reasoning_gym", "auto"} <= set(list_rewards())
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        get_reward("nope")

    class Const(Verifier):
        name = "const_test"

        def score(self, responses, samples):
            return RewardBatch.from_results([RewardResult(1.0, True, "correct") for _ in responses], time.perf_counter())

    register_reward("const_test", Const)
    assert get_reward("const_test").score(["x"], [{}]).rewards == [1.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math", Const)


def test_mismatched_lengths_raise(math_reward):
    with pytest.raises(ValueError, match="2 responses but 1 samples"):
        math_reward.score(["a", "b"], [{"answer": "1"}])


def test_stats_merge():
    a, b = RewardStats(), RewardStats()
    a.add(RewardResult(1.0, True, "correct"))
    b.add(RewardResult.fail("timeout"))
    a.merge(b)
    assert a.count == 2 and a.timeouts == 1 and a.mean_reward == 0.5
