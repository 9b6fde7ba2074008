"""The fidelity study's task family: three-term additions solved by named strategies.

Problems are reasoning-gym ``basic_arithmetic`` rows with three one-digit terms
("Calculate 4 + 1 + 7."), scored by reasoning-gym's own ``score_answer``. A response is a
short written computation (31-45 Qwen3 tokens): it restates the problem ("We need 4 + 1 + 7.")
and then announces its strategy. Three strategies are correct ways to add, two are wrong:

    left      ... Add from the left: 4 + 1 = 5, then 5 + 7 = 12. <answer>12</answer>
    right     ... Add from the right: 1 + 7 = 8, then 4 + 8 = 12. <answer>12</answer>
    ends      ... Pair the ends: 4 + 7 = 11, then 11 + 1 = 12. <answer>12</answer>
    first_two ... Add the first two: 4 + 1 = 5. <answer>5</answer>           (drops a term)
    estimate  ... Estimate: 4 + 1 + 7 is close to 10. <answer>10</answer>       (off by 1-3)

``tools/warmup_sft.py --task strategies`` warms a model up on a mixture that prefers
``left`` (STUDENT_MIX) and on teacher views (the trainer's teacher prompt with a correct
peer solution, or the bare reference answer, as context; TEACHER_*), so the tiny model can
read the privileged context the way a real LLM does. ``classify`` names the strategy of a
generated response (what ``tools/compare_runs.py`` counts for strategy diversity).
"""

from __future__ import annotations

import random
import re
from typing import Optional, Sequence

CORRECT = ("left", "right", "ends")
WRONG = ("first_two", "estimate")
STRATEGIES = CORRECT + WRONG

# what each strategy's response starts with (classify() reads it back)
OPENINGS = {
    "left": "Add from the left:",
    "right": "Add from the right:",
    "ends": "Pair the ends:",
    "first_two": "Add the first two:",
    "estimate": "Estimate:",
}

# the warm-up policy: prefers `left`, uses the other correct ways rarely, and a wrong way 45 % of the time
STUDENT_MIX = {"left": 0.40, "right": 0.08, "ends": 0.07, "first_two": 0.25, "estimate": 0.20}
# teacher views: the peer context is a correct solution (the trainer only uses correct peers);
# the teacher's own answer follows the context's strategy most of the time and is always correct
TEACHER_PEER_MIX = {"left": 0.6, "right": 0.2, "ends": 0.2}
TEACHER_FOLLOWS_PEER = 0.7
TEACHER_ANSWER_CONTEXT = 0.3  # share of teacher rows whose context is the bare reference answer (RLSD's)

# every response restates the problem first: routine tokens on which student and teacher agree
PREAMBLE = "We need {a} + {b} + {c}."
_TERMS = re.compile(r"Calculate\s+(\d+)\s*\+\s*(\d+)\s*\+\s*(\d+)")
INSTRUCTION = "Answer with <answer>N</answer>."
TASK_CONFIG = {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1, "operators": ["+"],
               "allow_parentheses": False, "allow_negation": False}


def terms_of(prompt_text: str) -> tuple[int, int, int]:
    """The three terms of a problem's question text."""
    m = _TERMS.search(prompt_text)
    if m is None:
        raise ValueError(f"not a three-term addition ('Calculate a + b + c.'): {prompt_text[:80]!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def render(strategy: str, terms: Sequence[int], rng: Optional[random.Random] = None) -> str:
    """The response text of ``strategy`` on ``terms`` (``estimate`` draws its error from ``rng``)."""
    a, b, c = terms
    s = a + b + c
    head = f"{PREAMBLE.format(a=a, b=b, c=c)} {OPENINGS[strategy]}"
    if strategy == "left":
        return f"{head} {a} + {b} = {a + b}, then {a + b} + {c} = {s}. <answer>{s}</answer>"
    if strategy == "right":
        return f"{head} {b} + {c} = {b + c}, then {a} + {b + c} = {s}. <answer>{s}</answer>"
    if strategy == "ends":
        return f"{head} {a} + {c} = {a + c}, then {a + c} + {b} = {s}. <answer>{s}</answer>"
    if strategy == "first_two":
        return f"{head} {a} + {b} = {a + b}. <answer>{a + b}</answer>"
    if strategy == "estimate":
        rng = rng or random.Random(0)
        g = max(0, s + rng.choice([-3, -2, -1, 1, 2, 3]))
        return f"{head} {a} + {b} + {c} is close to {g}. <answer>{g}</answer>"
    raise ValueError(f"unknown strategy {strategy!r}; known: {list(STRATEGIES)}")


def classify(text: str) -> str:
    """The strategy a response announces, or "other" (malformed / none)."""
    t = text.strip()
    if t.startswith("We need"):
        t = t.split(".", 1)[-1].strip()
    for name, head in OPENINGS.items():
        if t.startswith(head):
            return name
    return "other"


def draw(mix: dict[str, float], rng: random.Random) -> str:
    names = list(mix)
    return rng.choices(names, weights=[mix[n] for n in names])[0]


def student_response(terms: Sequence[int], rng: random.Random) -> tuple[str, str]:
    """(strategy, text) drawn from the warm-up policy."""
    strategy = draw(STUDENT_MIX, rng)
    return strategy, render(strategy, terms, rng)


def teacher_example(terms: Sequence[int], rng: random.Random) -> tuple[str, str, str]:
    """(context c, strategy, response) of one teacher-view warm-up row: c is a correct peer
    solution or the bare answer; the response is correct, mostly in the peer's strategy."""
    if rng.random() < TEACHER_ANSWER_CONTEXT:
        context = str(sum(terms))
        strategy = draw({k: STUDENT_MIX[k] for k in CORRECT}, rng)
    else:
        peer = draw(TEACHER_PEER_MIX, rng)
        context = render(peer, terms, rng)
        strategy = peer if rng.random() < TEACHER_FOLLOWS_PEER else rng.choice([k for k in CORRECT if k != peer])
    return context, strategy, render(strategy, terms, rng)
