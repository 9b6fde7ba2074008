"""reasoning_gym reward == the task's own score_answer, also after a jsonl round-trip."""

import json

import pytest
import reasoning_gym

from megatron_rlrt.data.generators import reasoning_gym_rows, write_jsonl
from megatron_rlrt.reward import ScoringPool, get_reward

TASKS = [
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 3}),
    ("chain_sum", {"min_terms": 2, "max_terms": 3}),
    ("countdown", {}),
]


@pytest.fixture(scope="module")
def pool():
    p = ScoringPool(num_workers=2)
    yield p
    p.close()


@pytest.mark.parametrize("task, config", TASKS)
def test_scores_match_score_answer_after_jsonl_round_trip(tmp_path, pool, task, config):
    path = tmp_path / f"{task}.jsonl"
    write_jsonl(reasoning_gym_rows(task, size=3, seed=11, config=config), path)
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    ds = reasoning_gym.create_dataset(task, size=3, seed=11, **config)  # independent reference

    wrong = "1+1"
    responses, expected = [], []
    for i, s in enumerate(samples):
        responses += [f"<think>hmm</think><answer>{s['answer']}</answer>", f"<answer>{wrong}</answer>"]
        expected += [ds.score_answer(answer=ds[i]["answer"], entry=ds[i]), ds.score_answer(answer=wrong, entry=ds[i])]
    reward = get_reward("reasoning_gym", timeout_s=10, pool=pool)
    batch = reward.score(responses, [s for s in samples for _ in range(2)])
    assert batch.rewards == pytest.approx(expected)
    assert batch.correct == [True, False] * 3
    assert expected[0] == 1.0 and expected[1] < 1.0


def test_boxed_fallback_binary_and_missing_metadata(pool):
    row = next(reasoning_gym_rows("chain_sum", size=1, seed=3))
    reward = get_reward("reasoning_gym", timeout_s=10, pool=pool, binary=True)
    batch = reward.score(
        [rf"\boxed{{{row['answer']}}}", "no answer at all", "<answer>1</answer>"],
        [row, row, {"answer": "1", "metadata": {}}],
    )
    assert [r.reason for r in batch.results] == ["correct", "no_answer", "bad_gold"]
    assert batch.rewards == [1.0, 0.0, 0.0]


def test_auto_router_mixes_math_and_reasoning_gym():
    row = next(reasoning_gym_rows("basic_arithmetic", size=1, seed=5))
    router = get_reward("auto", default="math", timeout_s=10, num_workers=2)
    try:
        batch = router.score(
            [f"<answer>{row['answer']}</answer>", r"\boxed{\frac{1}{2}}", r"\boxed{3}"],
            [row, {"answer": "0.5"}, {"answer": "4", "verifier": "math"}],
        )
        assert batch.rewards == [1.0, 1.0, 0.0]
        assert batch.stats.count == 3 and batch.stats.reasons["wrong"] == 1
    finally:
        router.close()


def test_dataset_samples_score_end_to_end(tmp_path, pool):
    """Generated jsonl -> PromptDataset (PromptSample objects) -> auto router."""
    from megatron_rlrt.data import load_prompt_dataset
    from megatron_rlrt.tokenizer import load_tokenizer

    path = tmp_path / "rg.jsonl"
    write_jsonl(reasoning_gym_rows("basic_arithmetic", size=2, seed=2), path)
    write_jsonl(
        [json.loads(x) for x in path.read_text().splitlines()] + [{"prompt": "1/2 = ?", "answer": "0.5", "verifier": "math"}],
        path,
    )
    ds = load_prompt_dataset(str(path), load_tokenizer())
    router = get_reward("auto", timeout_s=10, num_workers=1)
    try:
        batch = router.score([f"<answer>{ds[0].answer}</answer>", "<answer>-99999</answer>", r"\boxed{\frac12}"], list(ds))
        assert batch.rewards == [1.0, 0.0, 1.0]
    finally:
        router.close()
