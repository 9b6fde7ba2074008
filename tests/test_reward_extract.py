"""Answer extraction on hand-written responses (no sympy, no processes)."""

import pytest

from megatron_rlrt.reward.extract import (
    extract_math_answer,
    extract_tagged_answer,
    last_answer_line,
    last_answer_tag,
    last_boxed,
    split_think,
)
from megatron_rlrt.reward.testing import adversarial_text, reference_answer_tag, reference_last_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"The answer is \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{2}", "2"),  # last one wins
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"\fbox{7}", "7"),
        (r"$\boxed {x^{2}+1}$", "x^{2}+1"),  # space before the brace
        (r"so \boxed 5$", "5"),  # \boxed 5 form
        (r"\boxed{3} and a truncated \boxed{12", "3"),  # the last COMPLETE box
        (r"\boxedfoo{3}", None),  # not a \boxed command
        ("no box here", None),
        (r"\boxed{}", ""),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_split_think():
    assert split_think(r"<think>\boxed{1}</think> final \boxed{2}") == (r" final \boxed{2}", "closed")
    assert split_think("<think>still going") == (None, "unclosed")
    assert split_think("plain") == ("plain", "none")
    # a template that puts <think> in the prompt: the response only closes it
    assert split_think("reasoning</think>\n\nAnswer") == ("\n\nAnswer", "closed")


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"<think>maybe \boxed{1}</think>So \boxed{2}", ("2", "")),  # the box inside <think> is ignored
        (r"<think>\boxed{1}</think>no final box", (None, "no_boxed")),
        (r"<think>\boxed{1} and then the budget ran out", (None, "unclosed_think")),
        ("Work...\nAnswer: $34$", ("34", "")),  # DAPO-Math format
        ("   ", (None, "empty_response")),
        ("", (None, "empty_response")),
        (r"\boxed{}", (None, "parse_error")),
    ],
)
def test_extract_math_answer(response, expected):
    assert extract_math_answer(response) == expected


def test_answer_line_fallback_can_be_disabled():
    assert extract_math_answer("Answer: 3", answer_line_fallback=False) == (None, "no_boxed")
    assert last_answer_line("answer: 12.\nmore text\nAnswer: 7.") == "7"


@pytest.mark.parametrize(
    "text",
    ["<answer>12</answer>", "x <answer> 1 </answer> y <answer>2</answer>", "<answer>\nmulti\nline\n</answer>", "none"],
)
def test_answer_tag_matches_reasoning_gym(text):
    from reasoning_gym.utils import extract_answer

    assert last_answer_tag(text) == extract_answer(text)


def test_extract_tagged_answer_falls_back_to_boxed():
    assert extract_tagged_answer(r"<think><answer>1</answer></think><answer>2</answer>") == ("2", "")
    assert extract_tagged_answer(r"so \boxed{5}") == ("5", "")
    assert extract_tagged_answer("nothing") == (None, "no_answer")


# -- issue #13: extraction is linear, and equal to the reference rules on adversarial input -----

def test_extraction_equals_the_reference_rules_on_random_adversarial_text():
    import random

    rng = random.Random(13)
    for _ in range(20000):
        text = adversarial_text(rng)
        assert last_boxed(text) == reference_last_boxed(text), text
        assert last_answer_tag(text) == reference_answer_tag(text), text


def test_pathological_responses_of_the_issue_are_answered():
    """The 16k-token inputs of issue #13 (24.5 s and 9.6 s before) give the reference answer;
    their speed is measured in benchmarks/bench_extract.py, not asserted here."""
    assert extract_math_answer("\\boxed{" * 8000) == (None, "no_boxed")
    assert extract_tagged_answer("<answer>" * 8000) == (None, "no_answer")
    assert extract_math_answer("\\boxed{" * 8000 + "\\boxed{7}") == ("7", "")
    assert extract_tagged_answer("<answer>" * 8000 + "1</answer>") == (reference_answer_tag("<answer>" * 8000 + "1</answer>"), "")


def test_extraction_runs_inside_the_timed_worker():
    """A response whose extraction never returns scores 0 (timeout) and the batch comes back:
    extraction happens in the worker, under the per-item kill, not in the trainer."""
    import time

    from megatron_rlrt.reward import get_reward
    from megatron_rlrt.reward.math_verifier import MathVerifier
    from megatron_rlrt.reward.testing import hang_extracting

    class HangingExtraction(MathVerifier):
        extract_fn = staticmethod(hang_extracting)

    # 5 s: the ordinary item, scored in the fresh worker that replaces the killed one, must fit
    reward = HangingExtraction(timeout_s=5.0, num_workers=1)
    try:
        start = time.monotonic()
        batch = reward.score(["HANG \\boxed{2}", "\\boxed{2}"], [{"answer": "2"}] * 2)
        assert [r.reason for r in batch.results] == ["timeout", "correct"]
        assert time.monotonic() - start < 60  # bounded by the kill, not by the extraction
    finally:
        reward.close()
    assert get_reward("math", timeout_s=5).extract_fn is not None
