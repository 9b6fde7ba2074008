"""Log-prob ops: vocab-parallel log-probs/entropy of target tokens and the RLRT epilogue.

    vocab_parallel_logprobs(logits_shard, targets, temperature=1.0, tp_group=None, with_entropy=False,
                            inplace_backward=False)
    fused_linear_logprobs(hidden, weight_shard, targets, temperature=1.0, tp_group=None,
                          with_entropy=False, chunk_size=4096, reduce_hidden_grad=True)
    rlrt_epilogue(student_logprobs, teacher_logprobs, seq_advantages, rewards, response_mask,
                  lam, eps_w, method, has_teacher=None)
    backend() -> "cuda" | "cpp" | "torch"

Implementations: the csrc/ extension (C++ CPU kernels on ATen vectors; CUDA kernels), prebuilt
by setup.py or JIT-built on first use, else the pure-torch reference (ops/reference.py), which
is also the test oracle. See ops/dispatch.py for the selection and its environment variables.
"""

from megatron_rlrt.ops.dispatch import backend, info as backend_info
from megatron_rlrt.ops.epilogue import rlrt_epilogue
from megatron_rlrt.ops.logprobs import fused_linear_logprobs, vocab_parallel_logprobs

__all__ = ["backend", "backend_info", "fused_linear_logprobs", "rlrt_epilogue", "vocab_parallel_logprobs"]
