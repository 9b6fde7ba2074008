// The CUDA kernels of logprobs_cuda.cu and their launch logic, in a header of their own so that
// the same text also compiles for the CPU emulation of the CUDA thread model that the CPU test
// suite runs them under (tests/cuda_emu/; no GPU needed).
//
// Kernels: per-row log-softmax statistics (warp-level online softmax), the (onehot - softmax)
// gradient and the RLRT epilogue. bf16/fp16/fp32 in, fp32 accumulation; sm_80 and sm_90.
//
// One thread block per row. Each thread streams 8-element packs (one 16-byte load for bf16/fp16,
// two for fp32) keeping a running (max, sum-exp, entropy-sum); the block then merges the
// per-thread states with warp shuffles and one shared-memory round. The merge order is fixed, so
// results repeat bit for bit. See rlrt_ops.h for the statistics.
//
// Under nvcc this needs nothing more; the CPU emulation includes tests/cuda_emu/cuda_emu.h first.
#pragma once

#include <algorithm>
#include <cstdint>

#include "rlrt_ops.h"

namespace rlrt {
namespace cuda_impl {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPack = 8;
constexpr float kLow = -200.0f;  // see logprobs_cpu.cpp

struct Online {
  float m, s, q;
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

// 16 bytes of T, moved with one 128-bit load or store. Elements are read and written as T (no
// type punning through another type, which C++ leaves undefined): PyTorch's aligned_vector idea.
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kSize = 16 / sizeof(T);
  T val[kSize];
};

// 8 consecutive elements (16-byte aligned) as floats: one load for bf16/fp16, two for fp32.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* v) {
  constexpr int kPer = Pack16<T>::kSize;
#pragma unroll
  for (int k = 0; k < kPack / kPer; ++k) {
    const Pack16<T> pk = reinterpret_cast<const Pack16<T>*>(p)[k];
#pragma unroll
    for (int i = 0; i < kPer; ++i) v[k * kPer + i] = to_float(pk.val[i]);
  }
}

// 8 floats rounded to T (round to nearest even) into 16-byte aligned p.
template <typename T>
__device__ __forceinline__ void store8(T* p, const float* v) {
  constexpr int kPer = Pack16<T>::kSize;
#pragma unroll
  for (int k = 0; k < kPack / kPer; ++k) {
    Pack16<T> pk;
#pragma unroll
    for (int i = 0; i < kPer; ++i) pk.val[i] = from_float<T>(v[k * kPer + i]);
    reinterpret_cast<Pack16<T>*>(p)[k] = pk;
  }
}

// Move the running state to a new max (no-op unless it grows).
template <bool kEntropy>
__device__ __forceinline__ void rebase(Online& a, float new_max, float inv_t) {
  if (new_max > a.m) {
    if (a.s > 0.f) {
      const float d = (a.m - new_max) * inv_t;
      const float sc = expf(d);
      if (kEntropy) a.q = sc * (a.q + d * a.s);
      a.s *= sc;
    }
    a.m = new_max;
  }
}

template <bool kEntropy>
__device__ __forceinline__ void accumulate(Online& a, float x, float inv_t) {  // raw logit
  const float d = (x - a.m) * inv_t;
  const float e = expf(d);
  a.s += e;
  if (kEntropy) a.q += e * fmaxf(d, kLow);
}

template <bool kEntropy>
__device__ __forceinline__ Online merge(Online a, const Online& b, float inv_t) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;  // both empty
  Online r{m, 0.f, 0.f};
  if (a.s > 0.f) {
    const float d = (a.m - m) * inv_t, sc = expf(d);
    r.s += a.s * sc;
    if (kEntropy) r.q += sc * (a.q + d * a.s);
  }
  if (b.s > 0.f) {
    const float d = (b.m - m) * inv_t, sc = expf(d);
    r.s += b.s * sc;
    if (kEntropy) r.q += sc * (b.q + d * b.s);
  }
  return r;
}

template <typename scalar_t, bool kEntropy>
__global__ void __launch_bounds__(kThreads) stats_kernel(const scalar_t* __restrict__ logits, int64_t ld, int64_t V,
                                                          const int64_t* __restrict__ targets, float inv_t,
                                                          float* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * ld;
  Online st{-INFINITY, 0.f, 0.f};
  bool nan_seen = false;  // fmaxf skips NaN: track it apart and make the whole row NaN
  int64_t j0 = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    const int64_t packs = V / kPack;
    for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
      float v[kPack];
      load8<scalar_t>(x + p * kPack, v);
      float pm = -INFINITY;
#pragma unroll
      for (int i = 0; i < kPack; ++i) {
        nan_seen |= isnan(v[i]);
        pm = fmaxf(pm, v[i]);
      }
      if (pm == -INFINITY) continue;
      rebase<kEntropy>(st, pm, inv_t);
#pragma unroll
      for (int i = 0; i < kPack; ++i) accumulate<kEntropy>(st, v[i], inv_t);
    }
    j0 = packs * kPack;
  }
  for (int64_t j = j0 + threadIdx.x; j < V; j += kThreads) {
    const float v = to_float(x[j]);
    nan_seen |= isnan(v);
    if (v == -INFINITY || isnan(v)) continue;
    rebase<kEntropy>(st, v, inv_t);
    accumulate<kEntropy>(st, v, inv_t);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Online o{__shfl_xor_sync(0xffffffff, st.m, off), __shfl_xor_sync(0xffffffff, st.s, off),
             __shfl_xor_sync(0xffffffff, st.q, off)};
    st = merge<kEntropy>(st, o, inv_t);
  }
  __shared__ Online warp_states[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = st;
  nan_seen = __syncthreads_or(nan_seen);
  if (threadIdx.x == 0) {
    Online r = warp_states[0];
    for (int w = 1; w < kWarps; ++w) r = merge<kEntropy>(r, warp_states[w], inv_t);
    const int64_t tgt = targets[row];
    float* o = out + row * kNumStats;
    o[0] = nan_seen ? NAN : r.m;
    o[1] = nan_seen ? NAN : r.s;
    o[2] = (tgt >= 0 && tgt < V) ? to_float(x[tgt]) : 0.f;
    o[3] = kEntropy ? r.q : 0.f;
  }
}

template <bool kEntropy>
__device__ __forceinline__ float grad_value(float xv, float inv_t, float mx, float log_s, float a, float c, float k0,
                                            bool is_tgt) {
  float l = (xv - mx) * inv_t - log_s;
  float g;
  if (kEntropy) {
    l = fmaxf(l, kLow);
    g = -(expf(l) * (k0 + c * l));
  } else {
    g = expf(l) * -a;
  }
  return is_tgt ? a + g : g;
}

template <typename scalar_t, bool kEntropy>
__global__ void __launch_bounds__(kThreads) grad_kernel(const scalar_t* logits, int64_t ldx, scalar_t* out, int64_t ldg,
                                                         int64_t V, const int64_t* __restrict__ targets,
                                                         const float* __restrict__ norm, const float* __restrict__ g_lp,
                                                         const float* __restrict__ g_ent,
                                                         const float* __restrict__ entropy, float inv_t) {
  // out may alias logits: every element is read and written by the same thread, once.
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * ldx;
  scalar_t* g = out + row * ldg;
  const int64_t tgt = targets[row];
  const float mx = norm[2 * row], log_s = norm[2 * row + 1], a = g_lp[row] * inv_t;
  const float c = kEntropy ? g_ent[row] * inv_t : 0.f;
  const float k0 = kEntropy ? a + c * entropy[row] : a;
  int64_t j0 = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(g) % 16 == 0) {
    const int64_t packs = V / kPack;
    for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
      float v[kPack];
      load8<scalar_t>(x + p * kPack, v);
#pragma unroll
      for (int i = 0; i < kPack; ++i)
        v[i] = grad_value<kEntropy>(v[i], inv_t, mx, log_s, a, c, k0, p * kPack + i == tgt);
      store8<scalar_t>(g + p * kPack, v);
    }
    j0 = packs * kPack;
  }
  for (int64_t j = j0 + threadIdx.x; j < V; j += kThreads)
    g[j] = from_float<scalar_t>(grad_value<kEntropy>(to_float(x[j]), inv_t, mx, log_s, a, c, k0, j == tgt));
}

// Operation order and rounding of megatron_rlrt.algorithms.token_weights (no FMA contraction).
__global__ void epilogue_kernel(const float* __restrict__ s, const float* __restrict__ t, const float* __restrict__ adv,
                                const bool* __restrict__ gate, const bool* __restrict__ mask, float* __restrict__ out,
                                int64_t B, int64_t T, float lo, float hi, float lam, float oml, bool inverse) {
  const int64_t total = B * T;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / T;
    const float A = adv[b];
    float r = A;
    if (gate[b]) {
      float sg = A > 0.f ? 1.f : (A < 0.f ? -1.f : 0.f);
      if (inverse) sg = -sg;
      float w = expf(__fmul_rn(sg, __fsub_rn(s[i], t[i])));
      w = fminf(fmaxf(w, lo), hi);
      r = __fmul_rn(A, __fadd_rn(oml, __fmul_rn(lam, w)));
    }
    out[i] = mask[i] ? r : 0.f;
  }
}


// ----------------------------------------------------------------------------- launch logic
// Written once against a `launch(kernel, grid, block, args...)` callable: logprobs_cuda.cu passes
// one that runs kernel<<<grid, block, 0, stream>>>(args...), the CPU emulation one that runs the
// CUDA thread model on host threads.

template <class Launch>
at::Tensor stats_launch(const at::Tensor& logits, const at::Tensor& targets_in, double inv_temp, bool with_entropy,
                        const Launch& launch) {
  check_rows(logits, targets_in);
  const at::Tensor targets = targets_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(N <= INT32_MAX, "at most 2^31 - 1 rows per call (one CUDA block a row), got ", N);
  at::Tensor out = at::empty({N, kNumStats}, logits.options().dtype(at::kFloat));
  if (N == 0) return out;
  RLRT_DISPATCH_FLOATS(logits.scalar_type(), "rlrt_stats_cuda", [&] {
    auto kernel = with_entropy ? stats_kernel<scalar_t, true> : stats_kernel<scalar_t, false>;
    launch(kernel, N, kThreads, logits.const_data_ptr<scalar_t>(), logits.stride(0), V,
           targets.const_data_ptr<int64_t>(), static_cast<float>(inv_temp), out.data_ptr<float>());
  });
  return out;
}

template <class Launch>
void grad_launch(const at::Tensor& logits, const at::Tensor& targets_in, const at::Tensor& norm_in,
                 const at::Tensor& g_lp_in, const c10::optional<at::Tensor>& g_ent_in,
                 const c10::optional<at::Tensor>& entropy_in, double inv_temp, at::Tensor& out, const Launch& launch) {
  const GradInputs in = grad_inputs(logits, targets_in, norm_in, g_lp_in, g_ent_in, entropy_in, out);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(N <= INT32_MAX, "at most 2^31 - 1 rows per call (one CUDA block a row), got ", N);
  if (N == 0) return;
  const bool ent = in.with_entropy;
  RLRT_DISPATCH_FLOATS(logits.scalar_type(), "rlrt_grad_cuda", [&] {
    auto kernel = ent ? grad_kernel<scalar_t, true> : grad_kernel<scalar_t, false>;
    // out may be the logits themselves (in-place backward): plain data_ptr for both
    launch(kernel, N, kThreads, static_cast<const scalar_t*>(logits.data_ptr<scalar_t>()), logits.stride(0),
           out.data_ptr<scalar_t>(), out.stride(0), V, in.targets.const_data_ptr<int64_t>(),
           in.norm.const_data_ptr<float>(), in.g_lp.const_data_ptr<float>(),
           ent ? in.g_ent.const_data_ptr<float>() : nullptr, ent ? in.entropy.const_data_ptr<float>() : nullptr,
           static_cast<float>(inv_temp));
  });
}

constexpr int kEpilogueThreads = 256;
constexpr int64_t kEpilogueMaxBlocks = 65535;  // a grid-stride loop covers the rest

template <class Launch>
at::Tensor epilogue_launch(const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& adv_in,
                           const at::Tensor& gate_in, const at::Tensor& mask_in, double lam, double eps_w,
                           bool inverse, const Launch& launch, int64_t max_blocks = kEpilogueMaxBlocks) {
  const auto [student, teacher, adv, gate, mask] = epilogue_inputs(student_in, teacher_in, adv_in, gate_in, mask_in);
  const int64_t B = student.size(0), T = student.size(1);
  at::Tensor out = at::empty({B, T}, student.options());
  if (B * T == 0) return out;
  const int64_t blocks = std::min<int64_t>((B * T + kEpilogueThreads - 1) / kEpilogueThreads, max_blocks);
  launch(epilogue_kernel, blocks, kEpilogueThreads, student.const_data_ptr<float>(), teacher.const_data_ptr<float>(),
         adv.const_data_ptr<float>(), gate.const_data_ptr<bool>(), mask.const_data_ptr<bool>(), out.data_ptr<float>(),
         B, T, static_cast<float>(1.0 - eps_w), static_cast<float>(1.0 + eps_w), static_cast<float>(lam),
         static_cast<float>(1.0 - lam), inverse);
  return out;
}

}  // namespace cuda_impl
}  // namespace rlrt
