"""The fidelity study's task family (megatron_rlrt/data/strategy_task.py) and its warm-up rows
(tools/warmup_sft.py --task strategies): strategies compute what they claim, classify reads them
back, and teacher rows are the trainer's own teacher prompt with a correct context."""

from __future__ import annotations

import os
import random
import re
import sys
from types import SimpleNamespace

import pytest

from megatron_rlrt.algorithms.teacher import DEFAULT_TEMPLATE, render_teacher_prompt
from megatron_rlrt.data import strategy_task as task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _answer(text):
    return int(re.search(r"<answer>(-?\d+)</answer>", text).group(1))


@pytest.mark.parametrize("terms", [(4, 1, 7), (9, 9, 9), (1, 2, 3)])
def test_correct_strategies_add_and_wrong_ones_do_not(terms):
    rng = random.Random(0)
    for name in task.STRATEGIES:
        text = task.render(name, terms, rng)
        assert task.classify(text) == name
        if name in task.CORRECT:
            assert _answer(text) == sum(terms), text
            # every intermediate equation in the written computation is true
            for a, b, s in re.findall(r"(\d+) \+ (\d+) = (\d+)", text):
                assert int(a) + int(b) == int(s), text
        else:
            assert _answer(text) != sum(terms), text
    assert task.classify("Let me guess. <answer>3</answer>") == "other"


def test_terms_of_reads_the_question_and_rejects_others():
    assert task.terms_of("Calculate 4 + 1 + 7.\n\nAnswer with <answer>N</answer>.") == (4, 1, 7)
    with pytest.raises(ValueError, match="three-term addition"):
        task.terms_of("What is 3 * 4?")


def test_warmup_rows_student_mix_and_teacher_views():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import warmup_sft

    from megatron_rlrt.tokenizer import load_tokenizer

    tok = load_tokenizer()
    messages = [{"role": "user", "content": "Calculate 4 + 1 + 7.\n\nAnswer with <answer>N</answer>."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    sample = SimpleNamespace(messages=messages, prompt_text=text,
                             prompt_ids=tok(text, add_special_tokens=False)["input_ids"])
    rows = warmup_sft.StrategyResponses([sample], tok, teacher_fraction=0.5, enable_thinking=False)
    used, response_vocab = rows.vocabulary()
    rng = random.Random(0)
    n_teacher = n_student_correct = n_student = 0
    strategies = {k: 0 for k in task.STRATEGIES}
    for _ in range(2000):
        prompt, response, correct = rows.draw(0, rng)
        assert response[-1] == rows.eos and set(prompt) <= used and set(response) <= response_vocab
        body = tok.decode(response[:-1])
        if prompt != sample.prompt_ids:  # a teacher view: the trainer's teacher prompt around a correct context
            n_teacher += 1
            assert correct and _answer(body) == 12
            prompt_text = tok.decode(prompt)
            context = prompt_text.split("Correct solution:\n\n", 1)[1].split("\n\nCorrectly solve", 1)[0]
            assert context == "12" or (task.classify(context) in task.CORRECT and _answer(context) == 12)
            assert prompt == render_teacher_prompt(tok, messages, context, DEFAULT_TEMPLATE, False)
        else:
            n_student += 1
            n_student_correct += correct
            strategies[task.classify(body)] += 1
            assert correct == (_answer(body) == 12)
    # seeded draws: shares near the configured mixture (binomial sd ~ 0.016 at n ~ 1000)
    assert abs(n_teacher / 2000 - 0.5) < 0.05
    expected = sum(task.STUDENT_MIX[k] for k in task.CORRECT)
    assert abs(n_student_correct / n_student - expected) < 0.06
    assert max(strategies, key=strategies.get) == "left"
