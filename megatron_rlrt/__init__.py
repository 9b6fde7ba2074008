"""megatron-rlrt: RL post-training (GRPO, RLRT and self-distillation baselines) on Megatron-core."""

__version__ = "0.1.0"
