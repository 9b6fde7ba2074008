"""--plugins module for CLI tests: registers the synthetic ``hash_parity`` verifier."""

from megatron_rlrt.reward.registry import _REGISTERED, register_reward
from megatron_rlrt.reward.testing import HashParityVerifier

if "hash_parity" not in _REGISTERED:
    register_reward("hash_parity", HashParityVerifier)
