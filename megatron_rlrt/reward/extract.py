"""Pulling the final answer out of a model response (pure string functions, no sympy).

Rules, in the order the verifiers apply them:

1. ``<think>`` blocks: when the response contains ``</think>``, only the text after the LAST
   ``</think>`` is scored (a boxed answer inside the reasoning does not count). A response
   that opens ``<think>`` but never closes it never reached an answer (truncated or
   rambling): it scores 0 with reason ``unclosed_think``. A response with no think tags is
   scored whole.
2. Math: the content of the LAST complete ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces
   and escaped ``\\{``/``\\}`` handled, ``\\boxed 5`` accepted). When there is none, the last
   ``Answer: ...`` line (the DAPO-Math-17k prompt asks for that form). Neither: ``no_boxed``.
3. reasoning-gym: the last ``<answer>...</answer>`` (what ``reasoning_gym.utils.extract_answer``'s
   regex finds), else the last boxed answer, else ``no_answer``.

Every function here is linear in the response length (a 20k-token response of ``\\boxed{``
or ``<answer>`` repeated must not stall the trainer), and the verifiers call them inside the
timed scoring worker anyway.
"""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_LINE_RE = re.compile(r"(?i)\banswer\s*:\s*([^\n]+)")
_TOKEN_RE = re.compile(r"[^\s$]+")
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def split_think(text: str) -> tuple[str | None, str]:
    """(text to score, think status) with status in {"none", "closed", "unclosed"}.

    The text is None when the response opened a think block and never closed it.
    """
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1], "closed"
    if THINK_OPEN in text:
        return None, "unclosed"
    return text, "none"


def _matching_braces(text: str) -> dict[int, int]:
    """{index of '{': index just past its matching '}'} for every balanced pair, in one pass.

    A backslash escapes the next character (\\{, \\}, \\\\ never change the depth). Scanning from
    any unescaped ``{`` until the depth returns to 0 finds the same partner, so this one
    stack pass answers every ``\\boxed{`` at once (a scan per candidate is quadratic)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i + 1
        i += 1
    return pairs


def _box_content(text: str, end_of_name: int, pairs: dict[int, int]) -> str | None:
    """Content of one ``\\boxed`` whose name ends at ``end_of_name``; None if malformed."""
    i = end_of_name
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        close = pairs.get(i)
        if close is None:
            return None
        return text[i + 1 : close - 1].strip()
    if i > end_of_name and i < n:  # "\boxed 5": one token after a space
        m = _TOKEN_RE.match(text, i)
        return m.group(0) if m else None
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{}``/``\\fbox{}`` in ``text``, or None."""
    names = list(_BOX_RE.finditer(text))
    if not names:
        return None
    pairs = _matching_braces(text)
    for m in reversed(names):
        content = _box_content(text, m.end(), pairs)
        if content is not None:
            return content
    return None


def last_answer_line(text: str) -> str | None:
    """The value of the last ``Answer: ...`` line (DAPO-Math format), or None."""
    matches = _ANSWER_LINE_RE.findall(text)
    if not matches:
        return None
    value = matches[-1].strip()
    if value.endswith("."):
        value = value[:-1].rstrip()
    if len(value) >= 2 and value.startswith("$") and value.endswith("$"):
        value = value.strip("$").strip()
    return value or None


def last_answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``, stripped, or None: the last match of
    reasoning-gym's ``<answer>\\s?(.*?)\\s?</answer>`` (DOTALL), found with ``str.find`` in one
    left-to-right pass (the regex rescans to the end for every unclosed ``<answer>``)."""
    found, pos = None, 0
    while (start := text.find(ANSWER_OPEN, pos)) >= 0:
        end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
        if end < 0:
            break  # no later <answer> can close either
        found = text[start + len(ANSWER_OPEN) : end]
        pos = end + len(ANSWER_CLOSE)
    return found.strip() if found is not None else None


def extract_math_answer(response: str, answer_line_fallback: bool = True) -> tuple[str | None, str]:
    """(answer, reason) for a math response; reason is "" when an answer was found."""
    if not response or not response.strip():
        return None, "empty_response"
    text, _ = split_think(response)
    if text is None:
        return None, "unclosed_think"
    boxed = last_boxed(text)
    if boxed is not None:
        return (boxed, "") if boxed else (None, "parse_error")
    if answer_line_fallback:
        line = last_answer_line(text)
        if line is not None:
            return line, ""
    return None, "no_boxed"


def extract_tagged_answer(response: str) -> tuple[str | None, str]:
    """(answer, reason) for a reasoning-gym response: ``<answer>`` tag, else boxed."""
    if not response or not response.strip():
        return None, "empty_response"
    text, _ = split_think(response)
    if text is None:
        return None, "unclosed_think"
    tagged = last_answer_tag(text)
    if tagged is not None:
        return tagged, ""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, ""
    return None, "no_answer"
