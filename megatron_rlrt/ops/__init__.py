"""Log-prob ops: vocab-parallel log-probs/entropy of target tokens and the RLRT epilogue.

    vocab_parallel_logprobs(logits_shard, targets, temperature=1.0, tp_group=None, with_entropy=False,
                            inplace_backward=False)
    fused_linear_logprobs(hidden, weight_shard, targets, temperature=1.0, tp_group=None,
                          with_entropy=False, chunk_size=4096, reduce_hidden_grad=True)
    rlrt_epilogue(student_logprobs, teacher_logprobs, seq_advantages, rewards, response_mask,
                  lam, eps_w, method, has_teacher=None)
    backend() -> "cuda" | "cpp" | "torch"
    shard_logits, vocab_parallel_lse, global_topk_ids, gather_at_global_ids: top-K distillation
        over a tensor-parallel vocabulary (ops/vocab_topk.py)

Implementations: the csrc/ extension (C++ CPU kernels on ATen vectors; CUDA kernels), prebuilt
by setup.py or JIT-built on first use, else the pure-torch reference (ops/reference.py), which
is also the test oracle. See ops/dispatch.py for the selection and its environment variables.
"""

from megatron_rlrt.ops.dispatch import backend, info as backend_info
from megatron_rlrt.ops.epilogue import rlrt_epilogue
from megatron_rlrt.ops.logprobs import fused_linear_logprobs, vocab_parallel_logprobs
from megatron_rlrt.ops.vocab_topk import gather_at_global_ids, global_topk_ids, shard_logits, vocab_parallel_lse

__all__ = ["backend", "backend_info", "fused_linear_logprobs", "gather_at_global_ids", "global_topk_ids",
           "rlrt_epilogue", "shard_logits", "vocab_parallel_lse", "vocab_parallel_logprobs"]
