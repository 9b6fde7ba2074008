"""Rewards: verifiers by name, scored in a process pool with hard per-item timeouts.

    from megatron_rlrt.reward import get_reward
    verifier = get_reward("math", timeout_s=10)           # or "reasoning_gym", "auto"
    batch = verifier.score(responses, samples)            # RewardBatch
    batch.rewards, batch.correct, batch.stats.to_metrics()
    verifier.close()                                      # at the end of training
"""

from megatron_rlrt.reward.base import REASONS, RewardBatch, RewardResult, RewardStats, Verifier
from megatron_rlrt.reward.extract import extract_math_answer, extract_tagged_answer, last_boxed, split_think
from megatron_rlrt.reward.pool import ScoringPool
from megatron_rlrt.reward.registry import get_reward, list_rewards, register_reward

__all__ = [
    "REASONS",
    "RewardBatch",
    "RewardResult",
    "RewardStats",
    "ScoringPool",
    "Verifier",
    "extract_math_answer",
    "extract_tagged_answer",
    "get_reward",
    "last_boxed",
    "list_rewards",
    "register_reward",
    "split_think",
]
