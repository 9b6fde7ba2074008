"""The algorithms by name: one ``MethodSpec`` per method, in one registry.

A method is a sequence advantage (``ADVANTAGES``, GRPO's by default) plus (i) a per-token
weight on the advantage and the rollouts it applies to, (ii) which rollouts get a teacher
view, and (iii) which loss each rollout trains with (paper Appendix G.1, Table 4). Adding a
method is one ``register_method(MethodSpec(...))`` in a module of its own; pass that module
to the trainer with ``--plugins`` (see docs/architecture.md). Nothing outside this registry
checks a method's name: the trainer, the config and the tests read its spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Protocol, Sequence

import torch

from megatron_rlrt.algorithms.advantages import ADVANTAGES
from megatron_rlrt.algorithms.token_weights import rlrt_weight, rlsd_weight

# r = 1 means reward >= SUCCESS_THRESHOLD: works for {0, 1} and {-1, 1} rewards alike.
SUCCESS_THRESHOLD = 0.5
# --entropy-coef of a method with ``entropy_bonus`` when the flag is not given (GRPO+EB)
ENTROPY_BONUS_COEF = 0.001

TokenWeightFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (tokenizer, dataset row) -> the token ids the policy generates from
RolloutPromptFn = Callable[[Any, Any], list]


@dataclass
class RewardView:
    """A sequence a frozen scorer model reads to reward one rollout (RLT: the student's view,
    question + explanation -> reference solution). ``spans`` name [start, stop) ranges of
    ``response_ids``; ``flags`` carry per-rollout facts the reward needs (e.g. "matched")."""

    prompt_ids: list
    response_ids: list
    spans: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


class ModelReward(Protocol):
    """A reward computed by a model after generation instead of a verifier.

    ``view`` (rank 0, per rollout): the sequence the scorer reads. The trainer scores every
    view under the frozen scorer weights (one packed no-grad pass) and then calls ``rewards``
    on the last pipeline stage with, per local rollout, the policy's old log-probs of its
    response tokens and the scorer's log-probs of its view's response tokens."""

    def view(self, tokenizer, row, response_ids: Sequence[int]) -> RewardView: ...

    def rewards(self, policy_logprobs: Sequence[torch.Tensor], view_logprobs: Sequence[torch.Tensor],
                views: Sequence[RewardView], cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(rewards [B], per-rollout statistics {metric name: [B]} to log as means)."""
        ...


@dataclass(frozen=True)
class MethodSpec:
    """Everything the trainer needs to know about one method.

    token_weight: w_t(A, log P_S, log P_T) mixed into the advantage by eq. 7; None = A_t = A.
    weight_on: rollouts whose advantage is reweighted: "correct" (r = 1, RLRT's reward gate)
        or "all" (RLRT-all, RLSD).
    teacher_rows: rollouts that need a teacher forward: "none", "correct", "incorrect", "all"
        (always further restricted to rollouts that have a context).
    teacher_needs_signal: the teacher only matters where A != 0 (weighting methods), so
        zero-signal groups (all rewards equal) get no teacher forward.
    loss: "pg" (clipped surrogate on A_t), "distill" (distillation on teacher rows, no pg),
        "routed" (SRPO: distillation on r = 0 rows with a teacher, pg on all other rows).
    context: default privileged context c: "none", "peer" (a successful rollout of the same
        prompt), "reference_answer", "reference_solution".
    std_normalize: default advantage std normalisation (Table 5).
    entropy_bonus: the entropy term is on by default (--entropy-coef ENTROPY_BONUS_COEF; GRPO+EB).
    advantage: the sequence-level advantage estimator, a name in ``ADVANTAGES``.
    exposure: default teacher exposure (--teacher-exposure): "fixed:RHO" shows the teacher the
        first RHO of its context's tokens, "atesd" lets the ATESD controller choose
        (algorithms/atesd.py); "fixed:1" is the whole context.
    rollout_prompt: what the policy generates from, built from the dataset row on rank 0
        (RLT: question + reference solution in the teacher template); None = the row's prompt.
    model_reward: rewards come from a frozen scorer model after generation (``ModelReward``;
        the starting weights or --rlt-student-load) instead of the verifier; None = verifier.
    ref_update_interval, ref_update_mix: default --ref-update-interval / --ref-update-mix: with
        --kl-coef > 0, every ``ref_update_interval`` RL steps the reference policy becomes
        (1 - mix) ref + mix policy (TRL's sync_ref_model); 0 = the reference never moves.
    """

    name: str
    token_weight: Optional[TokenWeightFn] = None
    weight_on: Literal["correct", "all"] = "all"
    teacher_rows: Literal["none", "correct", "incorrect", "all"] = "none"
    teacher_needs_signal: bool = False
    loss: Literal["pg", "distill", "routed"] = "pg"
    context: Literal["none", "peer", "reference_answer", "reference_solution"] = "none"
    std_normalize: bool = False
    entropy_bonus: bool = False
    advantage: str = "grpo"
    exposure: str = "fixed:1"
    rollout_prompt: Optional[RolloutPromptFn] = None
    model_reward: Optional[ModelReward] = None
    ref_update_interval: int = 0
    ref_update_mix: float = 1.0

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_rows != "none"

    @property
    def uses_distillation(self) -> bool:
        return self.loss in ("distill", "routed")


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.advantage not in ADVANTAGES:
        raise ValueError(f"method {spec.name!r}: unknown advantage estimator {spec.advantage!r}; registered: "
                         f"{sorted(ADVANTAGES)} (register it with algorithms.register_advantage first)")
    METHODS[spec.name] = spec
    return spec


register_method(MethodSpec("grpo"))
register_method(MethodSpec("grpo_eb", entropy_bonus=True))
_WEIGHTED = dict(teacher_needs_signal=True, loss="pg", std_normalize=True)
register_method(
    MethodSpec("rlrt", rlrt_weight, weight_on="correct", teacher_rows="correct", context="peer", **_WEIGHTED)
)
register_method(MethodSpec("rlrt_all", rlrt_weight, weight_on="all", teacher_rows="all", context="peer", **_WEIGHTED))
register_method(
    MethodSpec("rlsd", rlsd_weight, weight_on="all", teacher_rows="all", context="reference_answer", **_WEIGHTED)
)
register_method(MethodSpec("sdpo", teacher_rows="all", loss="distill", context="peer"))
register_method(MethodSpec("srpo", teacher_rows="incorrect", loss="routed", context="peer"))
register_method(MethodSpec("opsd", teacher_rows="all", loss="distill", context="reference_solution"))


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(METHODS)}") from None


def is_correct(rewards: torch.Tensor, threshold: float = SUCCESS_THRESHOLD) -> torch.Tensor:
    """r(y) = 1 in the paper's notation."""
    return rewards >= threshold
