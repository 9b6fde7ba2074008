"""Rows for packing tests from parallel lists (the trainer builds its rows from samples)."""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_rlrt.packing import PackRow


def batch_rows(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    teacher_prompt_ids: Optional[Sequence[Optional[Sequence[int]]]] = None,
) -> list[PackRow]:
    """Student row i = prompt_ids[i] + response_ids[i]; teacher row i (where a teacher prompt
    exists) = teacher_prompt_ids[i] + the same response_ids[i]."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(response_ids)} responses")
    rows = [PackRow(list(p), list(r), "student", i) for i, (p, r) in enumerate(zip(prompt_ids, response_ids))]
    if teacher_prompt_ids is not None:
        if len(teacher_prompt_ids) != len(response_ids):
            raise ValueError(f"{len(teacher_prompt_ids)} teacher prompts for {len(response_ids)} responses")
        rows += [PackRow(list(t), list(response_ids[i]), "teacher", i)
                 for i, t in enumerate(teacher_prompt_ids) if t is not None]
    return rows
