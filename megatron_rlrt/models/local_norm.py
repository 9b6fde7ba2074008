"""RMSNorm of the local (CPU) layer spec that also runs under sequence parallelism.

megatron's ``WrappedTorchNorm`` (the local spec's norm without Apex/TE) refuses
``sequence_parallel``. Nothing in the norm itself depends on it: under sequence parallelism each
TP rank normalises its own slice of the sequence, so the weight's gradient is a partial sum that
megatron's ``finalize_model_grads`` all-reduces over TP for every parameter marked
``sequence_parallel`` -- the attribute ``TENorm`` and ``FusedLayerNorm`` set. This norm sets it
the same way, so CPU runs exercise the SP layout (all-gather before the column-parallel linears,
reduce-scatter after the row-parallel ones) that TE runs on a GPU.
"""

from __future__ import annotations

import torch


class LocalRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron's norm constructor signature and the SP weight mark."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"LocalRMSNorm: normalization={config.normalization!r}; Qwen3 uses RMSNorm")
        super().__init__(hidden_size, eps=eps)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
