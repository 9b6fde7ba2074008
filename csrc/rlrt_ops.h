// megatron-rlrt fused log-prob ops: shared declarations of the CPU and CUDA kernels.
//
// Every kernel works on one rank's vocabulary shard of a [N, V'] logits tensor (rows are
// tokens). The cross-rank combination of the per-row statistics happens in Python with ONE
// all-gather (megatron_rlrt/ops/logprobs.py); the kernels never communicate.
//
// Per-row statistics (float32, [N, 4]) for the shard, with k = inv_temp and d_j = (x_j - m) * k:
//   [0] m = max_j x_j  (raw logits; -inf for an empty or all -inf row)
//   [1] s = sum_j exp(d_j)
//   [2] t = x_target if the target is in this shard, else 0 (raw)
//   [3] q = sum_j exp(d_j) * d_j   (only when with_entropy; else 0)
// Shards combine with M = max m_r, a_r = (m_r - M) k, S = sum s_r e^a_r, T = sum t_r,
// Q = sum e^a_r (q_r + a_r s_r); then log p = (T - M) k - log S, H = log S - Q / S.
// Differences are taken in raw logits BEFORE scaling by 1/T, and the backward kernels take
// norm = [N, 2] = (M, log S) rather than log Z: with logits near 1e4, a rounded x/T or a float32
// log Z would carry ~1e-3 of absolute error into every log-prob and softmax value.
#pragma once

// Light ATen headers only (not torch/extension.h): the .cu file compiles several times faster.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <string>

// float32, bfloat16 and float16 logits (float64 goes to the torch reference in Python).
#define RLRT_DISPATCH_FLOATS(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                    \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)      \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace rlrt {

constexpr int kNumStats = 4;

// Input checks and preparation shared by the CPU and CUDA kernels.
inline void check_rows(const at::Tensor& logits, const at::Tensor& local_targets) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) == 0 || logits.stride(1) == 1, "logits rows must be contiguous");
  TORCH_CHECK(local_targets.dim() == 1 && local_targets.size(0) == logits.size(0),
              "targets must be [N] with N = ", logits.size(0), ", got ", local_targets.sizes());
  TORCH_CHECK(local_targets.scalar_type() == at::kLong, "targets must be int64");
  TORCH_CHECK(local_targets.device() == logits.device(), "targets must be on the logits' device");
}

// The backward's inputs, checked, as contiguous float32 (the entropy pair only when its gradient
// is given).
struct GradInputs {
  at::Tensor targets, norm, g_lp, g_ent, entropy;
  bool with_entropy = false;
};

inline GradInputs grad_inputs(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& norm,
                              const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent,
                              const c10::optional<at::Tensor>& entropy, const at::Tensor& out) {
  check_rows(logits, targets);
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type() &&
                  (logits.size(1) == 0 || out.stride(1) == 1),
              "out must have the logits' shape and dtype with contiguous rows");
  TORCH_CHECK(norm.dim() == 2 && norm.size(0) == logits.size(0) && norm.size(1) == 2, "norm must be [N, 2]");
  GradInputs in;
  in.targets = targets.contiguous();
  in.norm = norm.to(at::kFloat).contiguous();
  in.g_lp = g_lp.to(at::kFloat).contiguous();
  in.with_entropy = g_ent.has_value() && g_ent->defined();
  if (in.with_entropy) {
    TORCH_CHECK(entropy.has_value() && entropy->defined(), "entropy gradient needs the entropy");
    in.g_ent = g_ent->to(at::kFloat).contiguous();
    in.entropy = entropy->to(at::kFloat).contiguous();
  }
  return in;
}

// The epilogue's inputs as contiguous float32 [B, T] log-probs, [B] advantages, bool gate and mask.
struct EpilogueInputs {
  at::Tensor student, teacher, adv, gate, mask;
};

inline EpilogueInputs epilogue_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& adv,
                                      const at::Tensor& gate, const at::Tensor& mask) {
  return {student.to(at::kFloat).contiguous(), teacher.to(at::kFloat).contiguous(), adv.to(at::kFloat).contiguous(),
          gate.to(at::kBool).contiguous(), mask.to(at::kBool).contiguous()};
}

// CPU kernels (logprobs_cpu.cpp)
at::Tensor stats_cpu(const at::Tensor& logits, const at::Tensor& local_targets, double inv_temp,
                     bool with_entropy);
void grad_cpu(const at::Tensor& logits, const at::Tensor& local_targets, const at::Tensor& norm,
              const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent,
              const c10::optional<at::Tensor>& entropy, double inv_temp, at::Tensor& out);
at::Tensor epilogue_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& adv,
                        const at::Tensor& gate, const at::Tensor& mask, double lam, double eps_w,
                        bool inverse);
std::string cpu_capability();

#ifdef RLRT_WITH_CUDA
// CUDA kernels (logprobs_cuda.cu)
at::Tensor stats_cuda(const at::Tensor& logits, const at::Tensor& local_targets, double inv_temp,
                      bool with_entropy);
void grad_cuda(const at::Tensor& logits, const at::Tensor& local_targets, const at::Tensor& norm,
               const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent,
               const c10::optional<at::Tensor>& entropy, double inv_temp, at::Tensor& out);
at::Tensor epilogue_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& adv,
                         const at::Tensor& gate, const at::Tensor& mask, double lam, double eps_w,
                         bool inverse);
#endif

}  // namespace rlrt
