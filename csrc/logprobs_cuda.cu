// CUDA kernels: per-row log-softmax statistics (warp-level online softmax), the (onehot - softmax)
// gradient and the RLRT epilogue. bf16/fp16/fp32 in, fp32 accumulation; sm_80 and sm_90.
//
// One thread block per row. Each thread streams 8-element packs (16-byte loads for bf16/fp16,
// two float4 for fp32) keeping a running (max, sum-exp, entropy-sum); the block then merges the
// per-thread states with warp shuffles and one shared-memory round. The merge order is fixed, so
// results repeat bit for bit. See rlrt_ops.h for the statistics.

// c10 (not ATen/cuda) headers: they need no cuBLAS/cuSPARSE headers, so the file also compiles
// with a bare nvcc (tests/gpu/compile_check.sh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "rlrt_ops.h"

namespace rlrt {
namespace {

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

// 8 consecutive elements (16-byte aligned) as floats.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* v);

template <>
__device__ __forceinline__ void load8<float>(const float* p, float* v) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

template <>
__device__ __forceinline__ void load8<c10::BFloat16>(const c10::BFloat16* p, float* v) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

template <>
__device__ __forceinline__ void load8<c10::Half>(const c10::Half* p, float* v) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float* v);

template <>
__device__ __forceinline__ void store8<float>(float* p, const float* v) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

template <>
__device__ __forceinline__ void store8<c10::BFloat16>(c10::BFloat16* p, const float* v) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}

template <>
__device__ __forceinline__ void store8<c10::Half>(c10::Half* p, const float* v) {
  uint4 raw;
  __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
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

}  // namespace

at::Tensor stats_cuda(const at::Tensor& logits, const at::Tensor& targets_in, double inv_temp, bool with_entropy) {
  check_rows(logits, targets_in);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor targets = targets_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor out = at::empty({N, kNumStats}, logits.options().dtype(at::kFloat));
  if (N == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  RLRT_DISPATCH_FLOATS(logits.scalar_type(), "rlrt_stats_cuda", [&] {
    auto kernel = with_entropy ? stats_kernel<scalar_t, true> : stats_kernel<scalar_t, false>;
    kernel<<<N, kThreads, 0, stream>>>(logits.data_ptr<scalar_t>(), logits.stride(0), V, targets.data_ptr<int64_t>(),
                                       static_cast<float>(inv_temp), out.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void grad_cuda(const at::Tensor& logits, const at::Tensor& targets_in, const at::Tensor& norm_in,
               const at::Tensor& g_lp_in, const c10::optional<at::Tensor>& g_ent_in,
               const c10::optional<at::Tensor>& entropy_in, double inv_temp, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const GradInputs in = grad_inputs(logits, targets_in, norm_in, g_lp_in, g_ent_in, entropy_in, out);
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return;
  const bool ent = in.with_entropy;
  auto stream = c10::cuda::getCurrentCUDAStream();
  RLRT_DISPATCH_FLOATS(logits.scalar_type(), "rlrt_grad_cuda", [&] {
    auto kernel = ent ? grad_kernel<scalar_t, true> : grad_kernel<scalar_t, false>;
    kernel<<<N, kThreads, 0, stream>>>(logits.data_ptr<scalar_t>(), logits.stride(0), out.data_ptr<scalar_t>(),
                                       out.stride(0), V, in.targets.data_ptr<int64_t>(), in.norm.data_ptr<float>(),
                                       in.g_lp.data_ptr<float>(), ent ? in.g_ent.data_ptr<float>() : nullptr,
                                       ent ? in.entropy.data_ptr<float>() : nullptr, static_cast<float>(inv_temp));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor epilogue_cuda(const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& adv_in,
                         const at::Tensor& gate_in, const at::Tensor& mask_in, double lam, double eps_w,
                         bool inverse) {
  const c10::cuda::CUDAGuard guard(student_in.device());
  const auto [student, teacher, adv, gate, mask] = epilogue_inputs(student_in, teacher_in, adv_in, gate_in, mask_in);
  const int64_t B = student.size(0), T = student.size(1);
  at::Tensor out = at::empty({B, T}, student.options());
  if (B * T == 0) return out;
  const int blocks = static_cast<int>(std::min<int64_t>((B * T + 255) / 256, 65535));
  epilogue_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      student.data_ptr<float>(), teacher.data_ptr<float>(), adv.data_ptr<float>(), gate.data_ptr<bool>(),
      mask.data_ptr<bool>(), out.data_ptr<float>(), B, T, static_cast<float>(1.0 - eps_w),
      static_cast<float>(1.0 + eps_w), static_cast<float>(lam), static_cast<float>(1.0 - lam), inverse);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace rlrt
