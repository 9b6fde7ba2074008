"""Schedules for the mixing coefficient lam of eq. 7.

Both schedules are pure functions of the step, so the only state to checkpoint is the
trainer's step counter (``state_dict`` exists for symmetry with other checkpointed objects).
``step`` counts RL steps (one rollout batch = one step, whatever the number of optimizer
mini-batch updates inside it), starting at 0 for the first step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union


@dataclass(frozen=True)
class ConstantSchedule:
    """lam(step) = lam_init (the paper's "no decay": RLRT on base models)."""

    lam_init: float

    def __post_init__(self) -> None:
        _check_lam(self.lam_init)

    def value(self, step: int) -> float:
        return self.lam_init

    def state_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LinearDecaySchedule:
    """lam(step) = lam_init * max(0, 1 - step / decay_steps).

    Our reading of Table 5's "mixing decay steps": lam falls linearly from lam_init at step 0
    to 0 at step ``decay_steps`` and stays 0 (pure GRPO) afterwards. Paper values: RLRT 30
    (instruct, thinking models), RLSD 50, with lam_init = 0.5.
    """

    lam_init: float
    decay_steps: int

    def __post_init__(self) -> None:
        _check_lam(self.lam_init)
        if self.decay_steps <= 0:
            raise ValueError(f"decay_steps must be > 0, got {self.decay_steps}")

    def value(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.lam_init * max(0.0, 1.0 - step / self.decay_steps)

    def state_dict(self) -> dict:
        return asdict(self)


LambdaSchedule = Union[ConstantSchedule, LinearDecaySchedule]


def make_lambda_schedule(lam_init: float, decay_steps: Optional[int] = None) -> LambdaSchedule:
    """Constant when ``decay_steps`` is None or 0, linear decay otherwise."""
    if not decay_steps:
        return ConstantSchedule(lam_init)
    return LinearDecaySchedule(lam_init, decay_steps)


def _check_lam(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
