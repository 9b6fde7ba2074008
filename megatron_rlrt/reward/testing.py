"""Test-only scoring functions (module level so worker processes can import them).

``hang_on_marker`` behaves like the real math scorer except that a prediction containing
``HANG`` sleeps forever, standing in for a sympy call that never returns. Used as
``MathVerifier(item_fn=hang_on_marker)`` to prove the outside timeout.

Also the answer-extraction oracles and adversarial inputs shared by
tests/test_reward_extract.py and benchmarks/bench_extract.py: the per-candidate (quadratic)
rules the linear extractor replaced, random strings of the tokens that stress them, and the
pathological repeats of issue #13.
"""

from __future__ import annotations

import random
import re
import time

from megatron_rlrt.reward.worker import ItemScore, score_math

HANG_MARKER = "HANG"


def hang_on_marker(pred: str, gold: str, inner_timeout_s: int) -> ItemScore:
    if HANG_MARKER in pred:
        while True:  # ignores math-verify's alarm: only an outside kill ends this
            time.sleep(3600)
    return score_math(pred, gold, inner_timeout_s)


def crash_on_marker(pred: str, gold: str, inner_timeout_s: int) -> ItemScore:
    """A prediction containing ``CRASH`` kills its worker (like an OOM kill)."""
    if "CRASH" in pred:
        import os

        os._exit(9)
    return score_math(pred, gold, inner_timeout_s)


CRASH_ONCE_MARKER = "CRASH_ONCE:"


def crash_once_on_marker(pred: str, gold: str, inner_timeout_s: int) -> ItemScore:
    """``CRASH_ONCE:<path>`` in a prediction kills its worker the first time only (the path
    records that it happened), like a one-off OOM kill; then it is scored normally."""
    if CRASH_ONCE_MARKER in pred:
        import os

        flag = pred.split(CRASH_ONCE_MARKER, 1)[1].split("}", 1)[0]
        if not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(9)
        pred = pred.replace(CRASH_ONCE_MARKER + flag, "1")
    return score_math(pred, gold, inner_timeout_s)


class HashParityVerifier:
    """Synthetic verifier for tests and benchmarks: 'correct' iff crc32(response) is even.

    A random tiny model then has mixed groups (about half of each group correct), so every
    path that needs correct AND wrong rollouts (teacher views, token weights) does real work.
    It measures compute, never learning. Register it with
    ``register_reward("hash_parity", HashParityVerifier)``.
    """

    name = "hash_parity"

    def __init__(self, **_):
        pass

    def score(self, responses, samples):
        import zlib

        from megatron_rlrt.reward.base import RewardBatch, RewardResult

        start = time.perf_counter()
        results = [RewardResult(1.0, True, "correct") if zlib.crc32(r.encode()) % 2 == 0 else
                   RewardResult(0.0, False, "wrong") for r in responses]
        return RewardBatch.from_results(results, start)

    def close(self) -> None:
        pass


def hang_extracting(response: str, *args) -> tuple:
    """An extraction that never returns on a response containing ``HANG`` (standing in for a
    pathological response); otherwise the real math extraction."""
    from megatron_rlrt.reward.extract import extract_math_answer

    if HANG_MARKER in response:
        while True:
            time.sleep(3600)
    return extract_math_answer(response, *args)


# --- answer extraction: the reference rules and adversarial inputs ------------------------------

ANSWER_TAG_REGEX = r"<answer>\s?(.*?)\s?</answer>"  # reasoning_gym.utils.extract_answer

# the tokens random adversarial responses are made of: box commands, (escaped) braces, tags
ADVERSARIAL_PIECES = ("\\boxed", "\\fbox", "{", "}", "\\{", "\\}", "\\\\", " ", "\t", "x", "5", "$", "\\boxedx",
                      "<answer>", "</answer>", "<answer", "\n", "Answer: 3\n")

# issue #13's pathological responses: name -> the piece repeated n times
PATHOLOGICAL_PIECES = {"\\boxed{ x n": "\\boxed{", "<answer> x n": "<answer>"}


def adversarial_text(rng: random.Random, max_pieces: int = 12) -> str:
    """A random response of 0..``max_pieces`` ``ADVERSARIAL_PIECES``."""
    return "".join(rng.choice(ADVERSARIAL_PIECES) for _ in range(rng.randint(0, max_pieces)))


def reference_answer_tag(text: str) -> str | None:
    """reasoning-gym's lazy regex over every match (quadratic on unclosed tags): the last one."""
    matches = list(re.finditer(ANSWER_TAG_REGEX, text, flags=re.DOTALL))
    return matches[-1].group(1).strip() if matches else None


def reference_last_boxed(text: str) -> str | None:
    """The per-candidate scan the linear ``last_boxed`` replaces (one brace scan per ``\\boxed``
    candidate from the last one back: quadratic), kept as the oracle."""
    def braced(start):
        depth, i = 0, start
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            depth += (c == "{") - (c == "}")
            if c == "}" and depth == 0:
                return i + 1
            i += 1
        return None

    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text))):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            close = braced(i)
            if close is not None:
                return text[i + 1 : close - 1].strip()
        elif i > m.end() and i < len(text):
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                return tok.group(0)
    return None
