// CPU kernels: per-row log-softmax statistics, the (onehot - softmax) gradient and the RLRT
// epilogue, on ATen's Vectorized<float> (Sleef exp) with at::parallel_for over rows.
//
// Build flags pick the vector ISA (CPU_CAPABILITY=AVX512 / AVX2 / DEFAULT, see
// megatron_rlrt/ops/build.py); every row is processed by one thread in a fixed order, so results
// do not depend on the thread count and repeat bit for bit.
//
// Forward: a row is streamed once in blocks of kBlock elements (L1-resident): the block max,
// then exp-sums against the running max (online softmax: the running sums are rescaled when the
// max grows). Block sums accumulate in float vector lanes; the row sums in double.
// Backward: one pass, g_j = a (onehot_j - p_j) - c p_j (log p_j + H) with
// p_j = exp((x'_j - M) - log S),
// a = grad_logp / T, c = grad_entropy / T, written in the logits dtype.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

#include "rlrt_ops.h"

namespace rlrt {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kBlock = 4096;  // elements per online-softmax block (multiple of 2 * kVec)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// log p and x' - m are clamped to >= kLow where they multiply an exp(): exp(kLow) is 0 in float,
// so finite inputs are unchanged, and -inf logits give 0 * finite = 0 instead of NaN.
constexpr float kLow = -200.0f;

template <typename scalar_t>
inline Vec load_vec(const scalar_t* p) {
  Vec out;
  at::vec::load_to_float<scalar_t>(p, out);
  return out;
}

template <>
inline Vec load_vec<float>(const float* p) {
  return Vec::loadu(p);
}

// Store 2 * kVec results.
template <typename scalar_t>
inline void store2(scalar_t* p, const Vec& a, const Vec& b) {
  at::vec::convert_from_float<scalar_t>(a, b).store(p);
}

template <>
inline void store2<float>(float* p, const Vec& a, const Vec& b) {
  a.store(p);
  b.store(p + kVec);
}

inline float hmax(const Vec& v) {
  alignas(64) float buf[kVec];
  v.store(buf);
  float m = buf[0];
  for (int64_t i = 1; i < kVec; ++i) m = (buf[i] > m || std::isnan(buf[i])) ? buf[i] : m;
  return m;
}

inline float hsum(const Vec& v) {
  alignas(64) float buf[kVec];
  v.store(buf);
  float s = 0.f;
  for (int64_t i = 0; i < kVec; ++i) s += buf[i];
  return s;
}

template <typename scalar_t, bool kEntropy>
void row_stats(const scalar_t* x, int64_t V, float inv_t, int64_t tgt, float* out) {
  float m = kNegInf;
  double s = 0.0, q = 0.0;
  const Vec vinv(inv_t), vlow(kLow);
  alignas(64) float tail[kVec];
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t len = std::min(kBlock, V - b0);
    const scalar_t* xb = x + b0;
    const int64_t nv = len - len % kVec;
    const int64_t nt = len - nv;
    if (nt) {
      for (int64_t i = 0; i < kVec; ++i) tail[i] = i < nt ? static_cast<float>(xb[nv + i]) : kNegInf;
    }
    // block max of the raw logits (the order is the same after scaling by inv_t > 0)
    Vec mx0(kNegInf), mx1(kNegInf);
    int64_t i = 0;
    for (; i + 2 * kVec <= nv; i += 2 * kVec) {
      mx0 = at::vec::maximum(mx0, load_vec(xb + i));
      mx1 = at::vec::maximum(mx1, load_vec(xb + i + kVec));
    }
    for (; i < nv; i += kVec) mx0 = at::vec::maximum(mx0, load_vec(xb + i));
    if (nt) mx0 = at::vec::maximum(mx0, Vec::loadu(tail));
    const float bm = hmax(at::vec::maximum(mx0, mx1));
    if (std::isnan(bm)) {
      m = s = q = std::numeric_limits<float>::quiet_NaN();
      break;
    }
    if (bm == kNegInf) continue;  // every logit of the block is -inf: contributes nothing
    if (bm > m) {
      if (s > 0.0) {
        const double d = (static_cast<double>(m) - static_cast<double>(bm)) * inv_t;
        const double a = std::exp(d);
        if (kEntropy) q = a * (q + d * s);
        s *= a;
      }
      m = bm;
    }
    const Vec vm(m);
    Vec s0(0.f), s1(0.f), q0(0.f), q1(0.f);
    i = 0;
    for (; i + 2 * kVec <= nv; i += 2 * kVec) {
      const Vec d0 = (load_vec(xb + i) - vm) * vinv;
      const Vec d1 = (load_vec(xb + i + kVec) - vm) * vinv;
      const Vec e0 = d0.exp();
      const Vec e1 = d1.exp();
      s0 = s0 + e0;
      s1 = s1 + e1;
      if (kEntropy) {
        q0 = q0 + e0 * at::vec::maximum(d0, vlow);
        q1 = q1 + e1 * at::vec::maximum(d1, vlow);
      }
    }
    for (; i < nv; i += kVec) {
      const Vec d0 = (load_vec(xb + i) - vm) * vinv;
      const Vec e0 = d0.exp();
      s0 = s0 + e0;
      if (kEntropy) q0 = q0 + e0 * at::vec::maximum(d0, vlow);
    }
    if (nt) {
      const Vec d0 = (Vec::loadu(tail) - vm) * vinv;
      const Vec e0 = d0.exp();
      s1 = s1 + e0;
      if (kEntropy) q1 = q1 + e0 * at::vec::maximum(d0, vlow);
    }
    s += static_cast<double>(hsum(s0 + s1));
    if (kEntropy) q += static_cast<double>(hsum(q0 + q1));
  }
  out[0] = m;
  out[1] = static_cast<float>(s);
  out[2] = (tgt >= 0 && tgt < V) ? static_cast<float>(x[tgt]) : 0.f;
  out[3] = kEntropy ? static_cast<float>(q) : 0.f;
}

// One vector of gradient values for log p = l (already clamped when kEntropy).
template <bool kEntropy>
inline Vec grad_vec(const Vec& l, const Vec& vneg_a, const Vec& vk0, const Vec& vc) {
  const Vec p = l.exp();
  if (kEntropy) return Vec(0.f) - p * (vk0 + vc * l);
  return p * vneg_a;
}

template <typename scalar_t, bool kEntropy>
void row_grad(const scalar_t* x, scalar_t* g, int64_t V, float inv_t, float mx, float log_s, float a, float c,
              float k0, int64_t tgt) {
  const Vec vinv(inv_t), vmx(mx), vls(log_s), vneg_a(-a), vk0(k0), vc(c), vlow(kLow);
  auto logp = [&](const Vec& xv) {
    const Vec l = (xv - vmx) * vinv - vls;
    return kEntropy ? at::vec::maximum(l, vlow) : l;
  };
  // read before the loop: out may alias x (the fused-linear backward writes into its tile)
  const bool has_tgt = tgt >= 0 && tgt < V;
  const float xt = has_tgt ? static_cast<float>(x[tgt]) : 0.f;
  int64_t i = 0;
  for (; i + 2 * kVec <= V; i += 2 * kVec) {
    const Vec r0 = grad_vec<kEntropy>(logp(load_vec(x + i)), vneg_a, vk0, vc);
    const Vec r1 = grad_vec<kEntropy>(logp(load_vec(x + i + kVec)), vneg_a, vk0, vc);
    store2(g + i, r0, r1);
  }
  if (i < V) {
    alignas(64) float buf[2 * kVec];
    const int64_t nt = V - i;
    for (int64_t j = 0; j < 2 * kVec; ++j) buf[j] = j < nt ? static_cast<float>(x[i + j]) : 0.f;
    grad_vec<kEntropy>(logp(Vec::loadu(buf)), vneg_a, vk0, vc).store(buf);
    grad_vec<kEntropy>(logp(Vec::loadu(buf + kVec)), vneg_a, vk0, vc).store(buf + kVec);
    for (int64_t j = 0; j < nt; ++j) g[i + j] = static_cast<scalar_t>(buf[j]);
  }
  if (has_tgt) {  // the onehot term, from the same vector math as its neighbours
    alignas(64) float buf[kVec];
    grad_vec<kEntropy>(logp(Vec(xt)), vneg_a, vk0, vc).store(buf);
    g[tgt] = static_cast<scalar_t>(a + buf[0]);
  }
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

}  // namespace

std::string cpu_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

at::Tensor stats_cpu(const at::Tensor& logits_in, const at::Tensor& targets_in, double inv_temp,
                     bool with_entropy) {
  check_rows(logits_in, targets_in);
  const at::Tensor targets = targets_in.contiguous();
  const int64_t N = logits_in.size(0), V = logits_in.size(1);
  at::Tensor out = at::empty({N, kNumStats}, logits_in.options().dtype(at::kFloat));
  const float inv_t = static_cast<float>(inv_temp);
  const int64_t* tg = targets.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  RLRT_DISPATCH_FLOATS(logits_in.scalar_type(), "rlrt_stats_cpu", [&] {
    {
      const scalar_t* x = logits_in.data_ptr<scalar_t>();
      const int64_t ld = logits_in.stride(0);
      at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          if (with_entropy)
            row_stats<scalar_t, true>(x + r * ld, V, inv_t, tg[r], o + r * kNumStats);
          else
            row_stats<scalar_t, false>(x + r * ld, V, inv_t, tg[r], o + r * kNumStats);
        }
      });
    }
  });
  return out;
}

void grad_cpu(const at::Tensor& logits, const at::Tensor& targets_in, const at::Tensor& norm_in,
              const at::Tensor& g_lp_in, const c10::optional<at::Tensor>& g_ent_in,
              const c10::optional<at::Tensor>& entropy_in, double inv_temp, at::Tensor& out) {
  const GradInputs in = grad_inputs(logits, targets_in, norm_in, g_lp_in, g_ent_in, entropy_in, out);
  const int64_t N = logits.size(0), V = logits.size(1);
  const bool ent = in.with_entropy;
  const float inv_t = static_cast<float>(inv_temp);
  const int64_t* tg = in.targets.data_ptr<int64_t>();
  const float* nm = in.norm.data_ptr<float>();
  const float* glp = in.g_lp.data_ptr<float>();
  const float* gent = ent ? in.g_ent.data_ptr<float>() : nullptr;
  const float* h = ent ? in.entropy.data_ptr<float>() : nullptr;
  RLRT_DISPATCH_FLOATS(logits.scalar_type(), "rlrt_grad_cpu", [&] {
    {
      const scalar_t* x = logits.data_ptr<scalar_t>();
      scalar_t* g = out.data_ptr<scalar_t>();
      const int64_t ldx = logits.stride(0), ldg = out.stride(0);
      at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const float a = glp[r] * inv_t;
          if (ent) {
            const float c = gent[r] * inv_t;
            row_grad<scalar_t, true>(x + r * ldx, g + r * ldg, V, inv_t, nm[2 * r], nm[2 * r + 1], a, c,
                                     a + c * h[r], tg[r]);
          } else {
            row_grad<scalar_t, false>(x + r * ldx, g + r * ldg, V, inv_t, nm[2 * r], nm[2 * r + 1], a, 0.f, a,
                                      tg[r]);
          }
        }
      });
    }
  });
}

// A_t = A * ((1 - lam) + lam * clip(w_t, 1 - eps_w, 1 + eps_w)) on gated rows, A elsewhere, 0 off the
// mask; w_t = exp(sign(A) * (s_t - t_t)) (RLRT) or exp(-sign(A) * (s_t - t_t)) (RLSD, inverse).
// Same operation order and float rounding as megatron_rlrt.algorithms.token_weights.
at::Tensor epilogue_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& adv_in,
                        const at::Tensor& gate_in, const at::Tensor& mask_in, double lam, double eps_w,
                        bool inverse) {
  const auto [student, teacher, adv, gate, mask] = epilogue_inputs(student_in, teacher_in, adv_in, gate_in, mask_in);
  const int64_t B = student.size(0), T = student.size(1);
  at::Tensor out = at::empty({B, T}, student.options());
  const float lo = static_cast<float>(1.0 - eps_w), hi = static_cast<float>(1.0 + eps_w);
  const float lamf = static_cast<float>(lam), oml = static_cast<float>(1.0 - lam);
  const float* s = student.data_ptr<float>();
  const float* t = teacher.data_ptr<float>();
  const float* A = adv.data_ptr<float>();
  const bool* gt = gate.data_ptr<bool>();
  const bool* mk = mask.data_ptr<bool>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float bs[kVec], bt[kVec], bo[kVec];
    for (int64_t b = begin; b < end; ++b) {
      const float a = A[b];
      float* ob = o + b * T;
      const bool* mb = mk + b * T;
      if (!gt[b]) {
        for (int64_t j = 0; j < T; ++j) ob[j] = mb[j] ? a : 0.f;
        continue;
      }
      float sg = a > 0.f ? 1.f : (a < 0.f ? -1.f : 0.f);
      if (inverse) sg = -sg;
      const Vec va(a), vsg(sg), vlo(lo), vhi(hi), vlam(lamf), voml(oml);
      auto mixed = [&](const Vec& sv, const Vec& tv) {
        const Vec w = at::vec::minimum(at::vec::maximum((vsg * (sv - tv)).exp(), vlo), vhi);
        return va * (voml + vlam * w);
      };
      const float* sb = s + b * T;
      const float* tb = t + b * T;
      int64_t j = 0;
      for (; j + kVec <= T; j += kVec) mixed(Vec::loadu(sb + j), Vec::loadu(tb + j)).store(ob + j);
      if (j < T) {
        const int64_t nt = T - j;
        for (int64_t k = 0; k < kVec; ++k) {
          bs[k] = k < nt ? sb[j + k] : 0.f;
          bt[k] = k < nt ? tb[j + k] : 0.f;
        }
        mixed(Vec::loadu(bs), Vec::loadu(bt)).store(bo);
        for (int64_t k = 0; k < nt; ++k) ob[j + k] = bo[k];
      }
      for (int64_t k = 0; k < T; ++k)
        if (!mb[k]) ob[k] = 0.f;
    }
  });
  return out;
}

}  // namespace rlrt
