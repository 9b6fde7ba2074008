"""Verifiers by name.

Adding a verifier: write ``megatron_rlrt/reward/<name>_verifier.py`` with a
:class:`~megatron_rlrt.reward.base.Verifier` subclass and add one line to ``_BUILTIN``
(imported lazily, so an unused verifier's dependencies are never loaded). Code outside the
package can call :func:`register_reward` instead.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from megatron_rlrt.reward.base import Verifier

# name -> "module:attribute" of a Verifier class (or factory)
_BUILTIN: dict[str, str] = {
    "math": "megatron_rlrt.reward.math_verifier:MathVerifier",
    "reasoning_gym": "megatron_rlrt.reward.reasoning_gym_verifier:ReasoningGymVerifier",
    "auto": "megatron_rlrt.reward.router:RewardRouter",
}

_REGISTERED: dict[str, Callable[..., Verifier]] = {}


def register_reward(name: str, factory: Callable[..., Verifier] | None = None):
    """Register ``factory`` (a Verifier class) under ``name``; usable as a decorator."""

    def _add(f: Callable[..., Verifier]) -> Callable[..., Verifier]:
        if name in _REGISTERED or name in _BUILTIN:
            raise ValueError(f"a reward named {name!r} is already registered")
        _REGISTERED[name] = f
        return f

    return _add(factory) if factory is not None else _add


def list_rewards() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def reward_factory(name: str) -> Callable[..., Verifier]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise KeyError(f"unknown reward {name!r}; known: {', '.join(list_rewards())}")
    module, attr = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)


def get_reward(name: str, **kwargs: Any) -> Verifier:
    """A new verifier instance; keep it for the whole run so its worker pool is reused."""
    return reward_factory(name)(**kwargs)
