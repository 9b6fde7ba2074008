"""Test-only scoring functions (module level so worker processes can import them).

``hang_on_marker`` behaves like the real math scorer except that a prediction containing
``HANG`` sleeps forever, standing in for a sympy call that never returns. Used as
``MathVerifier(item_fn=hang_on_marker)`` to prove the outside timeout.
"""

from __future__ import annotations

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
