"""Functions that run INSIDE the scoring worker processes (one item per call).

Kept in one module that the pool imports before forking (so workers start with math-verify
loaded) and a forkserver can preload. Each function
returns a plain tuple ``(reward, correct, reason, detail)``: cheap to pickle, no classes to
keep in sync across processes.

Inside a worker, math-verify's own ``signal.alarm`` timeouts work (a worker runs tasks on its
main thread); they are the first, soft limit. The pool's outside kill is the hard one.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

ItemScore = tuple[float, bool, str, str]


def extract_and_score(extract, extract_args: tuple, score, response: str, score_args: tuple) -> tuple:
    """Answer extraction and scoring of one response, both inside the timed worker: no
    response, however long or adversarial, can stall the trainer's process. Returns
    ``(reward, correct, reason, detail, extracted)``; ``extracted`` is None when nothing was
    found (then ``reason`` says why, e.g. ``no_boxed``)."""
    answer, reason = extract(response, *extract_args)
    if answer is None:
        return 0.0, False, reason, "", None
    return (*score(answer, *score_args), answer)

_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _as_boxed(answer: str) -> str:
    """math-verify parses boxed content most reliably; gold answers are usually bare."""
    return answer if "\\boxed" in answer or "\\fbox" in answer else "\\boxed{" + answer + "}"


def _parse(answer: str, timeout_s: int) -> list:
    return parse(
        _as_boxed(answer),
        extraction_config=list(_EXTRACTION),
        parsing_timeout=timeout_s,
        raise_on_error=True,
    )


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int) -> tuple:
    """Gold answers repeat across the K samples of a prompt: parse each once per worker."""
    return tuple(_parse(gold, timeout_s))


def score_math(pred: str, gold: str, inner_timeout_s: int) -> ItemScore:
    """math-verify: parse gold and prediction, then ``verify(gold, pred)`` pair by pair."""
    try:
        gold_parsed = list(_parse_gold(gold, inner_timeout_s))
    except TimeoutException:
        return 0.0, False, "timeout", "parsing the gold answer timed out"
    except Exception as e:
        return 0.0, False, "bad_gold", f"gold {gold!r}: {type(e).__name__}: {e}"
    if not gold_parsed:
        return 0.0, False, "bad_gold", f"math-verify found nothing in gold {gold!r}"
    try:
        pred_parsed = _parse(pred, inner_timeout_s)
    except TimeoutException:
        return 0.0, False, "timeout", "parsing the answer timed out"
    except Exception as e:
        return 0.0, False, "parse_error", f"{type(e).__name__}: {e}"
    if not pred_parsed:
        return 0.0, False, "parse_error", ""
    # verify() on lists is any() over the product; doing the pairs here tells a
    # math-verify timeout apart from a plain mismatch.
    timed_out = False
    for g in gold_parsed:
        for p in pred_parsed:
            try:
                if verify(g, p, timeout_seconds=inner_timeout_s, raise_on_error=True):
                    return 1.0, True, "correct", ""
            except TimeoutException:
                timed_out = True
            except Exception:
                continue  # an incomparable pair (e.g. set vs matrix) is not a match
    if timed_out:
        return 0.0, False, "timeout", "math-verify comparison timed out"
    return 0.0, False, "wrong", ""


# ---------------------------------------------------------------------------------------
# reasoning-gym
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _rg_dataset(task: str, seed: int, size: int, config_json: str) -> Any:
    import reasoning_gym

    return reasoning_gym.create_dataset(task, seed=seed, size=size, **json.loads(config_json))


def rebuild_rg_entry(meta: dict) -> tuple[Any, dict]:
    """(dataset, entry) from the metadata a generated row stores (see data.generators).

    The entry is regenerated from (task, seed, size, config, index) so it carries the exact
    Python objects the task's scorer expects; if regeneration no longer yields the stored
    question (another reasoning-gym version), the stored JSON entry is used instead.
    """
    config_json = json.dumps(meta.get("config") or {}, sort_keys=True)
    ds = _rg_dataset(meta["task"], int(meta["seed"]), int(meta["size"]), config_json)
    entry = ds[int(meta["index"])]
    stored = meta.get("entry")
    if stored and stored.get("question") != entry.get("question"):
        entry = stored
    return ds, entry


def score_reasoning_gym(answer: str, meta: dict, correct_threshold: float) -> ItemScore:
    """The task's own ``score_answer(answer, entry)``."""
    try:
        ds, entry = rebuild_rg_entry(meta)
    except Exception as e:
        return 0.0, False, "bad_gold", f"cannot rebuild reasoning-gym entry: {type(e).__name__}: {e}"
    score = float(ds.score_answer(answer=answer, entry=entry))
    score = min(1.0, max(0.0, score))
    correct = score >= correct_threshold
    reason = "correct" if correct else ("partial" if score > 0 else "wrong")
    return score, correct, reason, ""
