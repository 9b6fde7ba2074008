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
3. reasoning-gym: the last ``<answer>...</answer>`` (same regex as
   ``reasoning_gym.utils.extract_answer``), else the last boxed answer, else ``no_answer``.
"""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_LINE_RE = re.compile(r"(?i)\banswer\s*:\s*([^\n]+)")
# Same pattern as reasoning_gym.utils.extract_answer (kept here so the parent process need not
# import reasoning_gym, which takes seconds).
_ANSWER_TAG_RE = re.compile(r"<answer>\s?(.*?)\s?</answer>", flags=re.DOTALL)


def split_think(text: str) -> tuple[str | None, str]:
    """(text to score, think status) with status in {"none", "closed", "unclosed"}.

    The text is None when the response opened a think block and never closed it.
    """
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1], "closed"
    if THINK_OPEN in text:
        return None, "unclosed"
    return text, "none"


def _braced(text: str, start: int) -> int | None:
    """Index just past the ``}`` matching the ``{`` at ``start``, or None if unbalanced."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # an escaped char (\{, \}, \\) never changes the depth
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _box_content(text: str, end_of_name: int) -> str | None:
    """Content of one ``\\boxed`` whose name ends at ``end_of_name``; None if malformed."""
    i = end_of_name
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        close = _braced(text, i)
        if close is None:
            return None
        return text[i + 1 : close - 1].strip()
    if i > end_of_name and i < n:  # "\boxed 5": one token after a space
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{}``/``\\fbox{}`` in ``text``, or None."""
    for m in reversed(list(_BOX_RE.finditer(text))):
        content = _box_content(text, m.end())
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
    """Content of the last ``<answer>...</answer>``, stripped, or None."""
    matches = list(_ANSWER_TAG_RE.finditer(text))
    return matches[-1].group(1).strip() if matches else None


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
