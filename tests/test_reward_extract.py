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
