"""Which columns hold the prompt, the gold answer and the reference solution.

Known layouts (auto-detected from the column names, or chosen by name):

=========  ==========================================  ==================================
layout     columns                                     answer / solution
=========  ==========================================  ==================================
dapo       ``prompt`` (chat messages), ``reward_model``  ``reward_model.ground_truth`` / -
           (``{"ground_truth", "style"}``),
           ``data_source``, ``extra_info``
math       ``problem``, ``solution``, ``answer``?,       ``answer``, else the last
           ``level``, ``type``                           ``\\boxed{}`` of ``solution``
gsm8k      ``question``, ``answer`` (``... #### 72``)    after ``####`` / before ``####``
rlrt       ``prompt``, ``answer``, ``solution``?,         ``answer`` / ``solution``
           ``verifier``?, ``metadata``? (our generators)
=========  ==========================================  ==================================

``prompt_key`` / ``answer_key`` / ``solution_key`` override a layout's columns (dotted paths
reach into nested dicts, e.g. ``reward_model.ground_truth``). A column named explicitly is
required in every row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable

from megatron_rlrt.data.errors import DatasetError

_MISSING = object()


@dataclass(frozen=True)
class Columns:
    name: str
    prompt: str
    answer: str | None
    solution: str | None = None
    answer_required: bool = True  # False: fall back to the solution's last \boxed{}
    solution_required: bool = False
    answer_format: str = "plain"  # "plain" | "gsm8k" ("reasoning #### answer")


LAYOUTS: dict[str, Columns] = {
    "dapo": Columns("dapo", prompt="prompt", answer="reward_model.ground_truth"),
    "math": Columns("math", prompt="problem", answer="answer", solution="solution", answer_required=False),
    "gsm8k": Columns("gsm8k", prompt="question", answer="answer", answer_format="gsm8k"),
    "rlrt": Columns("rlrt", prompt="prompt", answer="answer", solution="solution"),
}


def detect_layout(columns: Iterable[str]) -> str | None:
    """The layout whose signature columns are present, or None."""
    cols = set(columns)
    if {"prompt", "reward_model"} <= cols:
        return "dapo"
    if "problem" in cols and ({"solution", "answer"} & cols):
        return "math"
    if {"question", "answer"} <= cols:
        return "gsm8k"
    if {"prompt", "answer"} <= cols:
        return "rlrt"
    return None


def resolve_columns(
    path: str,
    columns: Iterable[str],
    layout: str = "auto",
    prompt_key: str | None = None,
    answer_key: str | None = None,
    solution_key: str | None = None,
) -> Columns:
    """The column mapping for a file: the named (or detected) layout plus explicit keys."""
    cols = list(columns)
    if layout == "auto":
        name = detect_layout(cols)
        if name is None and prompt_key and answer_key:
            name = "rlrt"
        if name is None:
            raise DatasetError(
                path,
                None,
                f"cannot tell the dataset layout from its columns {sorted(cols)}; expected one of "
                f"{', '.join(LAYOUTS)} (see megatron_rlrt.data.layouts) or name the columns with "
                "prompt_key/answer_key (--prompt-key/--answer-key)",
            )
    elif layout in LAYOUTS:
        name = layout
    else:
        raise ValueError(f"unknown data layout {layout!r}; expected 'auto' or one of {', '.join(LAYOUTS)}")
    spec = LAYOUTS[name]
    if prompt_key:
        spec = replace(spec, prompt=prompt_key)
    if answer_key:
        spec = replace(spec, answer=answer_key, answer_required=True)
    if solution_key:
        spec = replace(spec, solution=solution_key, solution_required=True)
    if prompt_key or answer_key or solution_key:
        spec = replace(spec, name=f"{spec.name}+keys")
    return spec


def get_path(row: dict, dotted: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``; a top-level key containing dots wins. _MISSING if absent."""
    if dotted in row:
        return row[dotted]
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def is_missing(value: Any) -> bool:
    return value is _MISSING


def top_level(dotted: str | None) -> str | None:
    return None if dotted is None else dotted.split(".")[0]
