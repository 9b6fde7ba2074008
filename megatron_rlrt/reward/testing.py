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
