// Per-element SMES math (SPEC §1), written once for every compiled backend.
//
// `smes_update` is a template over the value type T: `float` in the CUDA kernel (one element per
// call) and a GCC vector of floats in the CPU kernel (one SIMD register per call). The element-wise
// primitives that differ between the two (sqrt, (v/bc2)^p, m/D for general p, NaN-propagating max) come from the
// policy class M. Special cases are compile-time switches; every hyperparameter is a runtime scalar.
//
// This header includes nothing from torch, so nvcc can compile it on a machine whose torch is
// CPU-only.
#pragma once

#if defined(__CUDACC__)
#define SMES_HD static __host__ __device__ __forceinline__
#else
// static: internal linkage, so each per-ISA translation unit keeps its own copy (no ODR merging
// of code compiled for different instruction sets).
#define SMES_HD static inline __attribute__((always_inline))
#endif

#include <cstdint>

#if !defined(__CUDACC__)
#include <cmath>
using std::fabs;
using std::sqrt;
#endif

namespace smes {

// Storage dtype codes of params and state.
enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Exponent classes: the only values of p that are compile-time variants (SPEC §3).
enum PClass : int { P_ZERO = 0, P_HALF = 1, P_GENERAL = 2 };

// Variant code of one tensor: p_class in bits 0-1, then the structural switches.
constexpr int kPClassMask = 3;
constexpr int kTrackV = 4;   // v (exp_avg_sq) is read and written
constexpr int kAmsgrad = 8;  // v_max is read, written and used (only with kTrackV)
constexpr int kL2 = 16;      // weight decay added to the gradient (not decoupled), lambda != 0
constexpr int kProject = 32; // projection (SPEC §4): the CUDA binding's launch groups

// Flags column of the host hyperparameter table (see csrc/smes_cpu.cpp).
constexpr int kFlagBiasCorrection = 1;
constexpr int kFlagDecoupled = 2;
constexpr int kFlagAmsgrad = 4;
constexpr int kFlagMaximize = 8;
constexpr int kFlagTrackV = 16;
constexpr int kFlagRectify = 32;     // RAdam's rectification (SPEC §4)
constexpr int kFlagSumV = 64;        // AdaGrad: v <- v + g^2, no bc2 (second_moment="sum")
constexpr int kFlagProjection = 128; // AdamP/SGDP's projection (tensors of dim > 1)
constexpr int kFlagSR = 256;         // stochastic rounding of theta (bf16 params)

// Stochastic rounding to bfloat16 (smes_fused/_rounding.py has the definition): a counter-based
// hash gives 16 random bits per element, added to the float32 bits before truncation. U: uint32_t,
// or a GCC vector of them (the CPU kernel, a SIMD register of elements at a time).
template <class U>
SMES_HD U mix32(U x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}
// the key of a step: seed is the tensor's own (smes_fused/_rounding.py: its group's XOR its salt)
SMES_HD uint32_t sr_key(uint32_t seed, uint32_t step) {
  return mix32(seed ^ mix32(step * 0x9E3779B9u));
}
// the noise of element index = hi * 2^32 + lo from kh = key ^ mix32(hi), which the elements of a
// vector share (the CPU kernel: kh and lo vectors)
template <class U>
SMES_HD U sr_noise_lo(U kh, U lo) {
  return mix32(kh ^ lo) & 0xFFFFu;
}
SMES_HD uint32_t sr_noise(uint32_t key, uint64_t index) {
  return sr_noise_lo(key ^ mix32((uint32_t)(index >> 32)), (uint32_t)index);
}

// The per-tensor scalars of one step, hoisted out of the element loop (float32).
struct Scalars {
  float beta1, omb1;   // beta1, 1 - beta1
  float beta2, omb2;   // beta2, 1 - beta2
  float gmul;          // (maximize ? -1 : 1) * (1 / grad_scale)
  float l2;            // lambda when kL2
  float decay;         // 1 - lr * lambda for decoupled weight decay, else exactly 1
  float step_size;     // lr / bc1
  float eps;
  float d0;            // 1 + eps (P_ZERO)
  float bc2_sqrt;      // sqrt(bc2) (P_HALF)
  float p;             // exponent (P_GENERAL)
  float log2_shift;    // -p * log2(bc2), so that p*log2(v/bc2) = p*log2(v) + log2_shift
  float bc2_pow;       // bc2^-p, so that (v/bc2)^p = v^p * bc2_pow
  float p_hi, p_lo;    // p = p_hi + p_lo exactly, p_hi with 12 significant bits
  float decay_proj;    // decay when the projection applies: 1 - lr * lambda * wd_ratio
  bool adaptive;       // false: rectify with rho_t <= 5: u = m-hat, the p = 0 rule with d0 = 1
};

// The float64 host (or device) part: bias corrections and the hoisted scalars.
// bc1 = 1 - beta1^t, bc2 = 1 - beta2^t in float64, both 1 without bias correction.
// AdaGrad (kFlagSumV): v <- 1 * v + 1 * g^2 and bc2 = 1. Rectification (kFlagRectify, p != 0):
// rho_inf = 2/(1 - beta2) - 1, rho_t = rho_inf - 2 t beta2^t/(1 - beta2^t); while rho_t <= 5 the
// step is u = m-hat (adaptive = false: the caller runs the p = 0 rule with d0 = 1, as RAdam), after
// that step_size is multiplied by r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)
// (rho_inf - 2) rho_t)) and eps is eps / bc2^p: torch's RAdam divides by
// (sqrt(v) + eps) / sqrt(bc2).
template <class PowFn, class SqrtFn, class Log2Fn>
SMES_HD Scalars make_scalars(double lr, double beta1, double beta2, double eps, double p,
                             double wd, int flags, double step, float inv_scale, PowFn pw,
                             SqrtFn sq, Log2Fn lg, double proj_wd_ratio = 1.0) {
  Scalars s;
  double bc1 = 1.0, bc2 = 1.0;
  if (flags & kFlagBiasCorrection) {
    bc1 = 1.0 - pw(beta1, step);
    bc2 = 1.0 - pw(beta2, step);
  }
  const bool sum_v = (flags & kFlagSumV) != 0;
  if (sum_v) bc2 = 1.0;
  double rect = 1.0;
  bool rectified = false;  // an adaptive rectified step: eps / bc2^p, see s.eps
  s.adaptive = true;
  if ((flags & kFlagRectify) && p != 0.0) {
    const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
    const double b2t = pw(beta2, step);
    const double rho_t = rho_inf - 2.0 * step * b2t / (1.0 - b2t);
    if (rho_t > 5.0) {
      rect = sq((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t));
      rectified = true;
    } else {
      s.adaptive = false;
    }
  }
  s.beta1 = (float)beta1;
  s.omb1 = (float)(1.0 - beta1);
  s.beta2 = sum_v ? 1.f : (float)beta2;
  s.omb2 = sum_v ? 1.f : (float)(1.0 - beta2);
  s.gmul = (flags & kFlagMaximize) ? -inv_scale : inv_scale;
  const bool decoupled = (flags & kFlagDecoupled) != 0;
  s.l2 = decoupled ? 0.f : (float)wd;
  s.decay = (decoupled && wd != 0.0) ? (float)(1.0 - lr * wd) : 1.f;
  s.decay_proj = (decoupled && wd != 0.0) ? (float)(1.0 - lr * wd * proj_wd_ratio) : 1.f;
  s.step_size = (float)(lr / bc1);
  if (s.adaptive && rect != 1.0) s.step_size = (float)(lr / bc1 * rect);
  const double bc2_pow = pw(bc2, -p);  // bc2^-p
  // torch's RAdam adds eps before the bias correction: eps / bc2^p on rectified steps
  s.eps = (float)(rectified ? eps * bc2_pow : eps);
  s.d0 = (float)(1.0 + eps);  // 1 where a rectified step is not adaptive (its callers set it)
  s.bc2_sqrt = (float)sq(bc2);
  s.p = (float)p;
  s.log2_shift = (float)(-p * lg(bc2));
  s.bc2_pow = (float)bc2_pow;
  const float c = 4097.0f * s.p;  // Veltkamp split of the float exponent
  s.p_hi = c - (c - s.p);
  s.p_lo = s.p - s.p_hi;
  return s;
}

SMES_HD int p_class_of(double p) { return p == 0.0 ? P_ZERO : (p == 0.5 ? P_HALF : P_GENERAL); }

// Variant code from the flags column and the exponent.
SMES_HD int variant_code(double p, double wd, int flags) {
  int code = p_class_of(p);
  if (flags & kFlagTrackV) {
    code |= kTrackV;
    if (flags & kFlagAmsgrad) code |= kAmsgrad;
  }
  if (!(flags & kFlagDecoupled) && wd != 0.0) code |= kL2;
  return code;
}

// The parts of one SMES step on one value (element or SIMD register), shared by the plain step
// and the projection's two passes (SPEC §4). `v`/`vmax` are only touched when the variant tracks
// them; with P_ZERO, v is updated when tracked (exponent schedules) but not read. `s`: Scalars, or
// a kernel's extension of it with constants of its own (derived from Scalars once per tensor)
// that M's functions read.

// Moments, g already multiplied by gmul (maximize, 1/grad_scale: smes_front): L2, then m, v, vmax
// updated. Returns v-hat's source (v or vmax; unspecified when v is not tracked). `g` leaves
// holding the gradient after L2.
template <bool TV, bool AMS, bool L2, class M, class T, class S>
SMES_HD T smes_moments(T th, T& g, T& m, T& v, T& vmax, const S& s) {
  if (L2) g = g + s.l2 * th;       // L2: g + lambda * theta
  m = s.beta1 * m + s.omb1 * g;
  T vv = m;
  if (TV) {
    v = s.beta2 * v + s.omb2 * (g * g);
    vv = v;
    if (AMS) {
      vmax = M::max_nan(vmax, v);
      vv = vmax;
    }
  }
  return vv;
}

// The update direction u = m / D (SPEC §1), without the step size.
template <int PC, class M, class T, class S>
SMES_HD T smes_direction(T m, T vv, const S& s) {
  if (PC == P_ZERO) {
    return m / s.d0;
  } else if (PC == P_HALF) {
    // torch.optim.AdamW's order: sqrt(v) / sqrt(bc2) + eps
    T d = M::sqrt(vv) / s.bc2_sqrt + s.eps;
    return m / d;
  } else {
    // (v/bc2)^p; v = 0, p < 0 gives inf, so the update is 0
    T d = M::pow_hat(vv, s) + s.eps;
    return M::quot(m, d);  // m / d
  }
}

// One SMES step on one value. smes_front (g scaled, the moments; returns v-hat's source) is also
// the first stage of the AVX2 CPU kernel's general-p pipeline (smes_moments alone where gmul is 1
// and there is no L2 term: g * 1 is exact and only ever a factor there), whose last stage spells
// out the last two lines again: theta * decay first, then theta - step_size * u, in that order (GCC
// contracts the second into one FMA; the other order rounds step_size * u instead, and twice
// where decay is 1).
template <bool TV, bool AMS, bool L2, class M, class T, class S>
SMES_HD T smes_front(T th, T g, T& m, T& v, T& vmax, const S& s) {
  g = g * s.gmul;                  // maximize, then 1/grad_scale (both exact when 1)
  return smes_moments<TV, AMS, L2, M>(th, g, m, v, vmax, s);
}
template <int PC, bool TV, bool AMS, bool L2, class M, class T, class S>
SMES_HD void smes_update(T& th, T g, T& m, T& v, T& vmax, const S& s) {
  T vv = smes_front<TV, AMS, L2, M>(th, g, m, v, vmax, s);
  th = th * s.decay;               // decoupled: theta * (1 - lr * lambda); exact when 1
  th = th - s.step_size * smes_direction<PC, M>(m, vv, s);
}

// AdamP/SGDP's per-row quantities (SPEC §4) from the row sums x = (g.theta, g.g, theta.theta,
// theta.u), g before L2: |cos(g, theta)| as torch's cosine_similarity (norms clamped at eps), and
// the coefficient k of u <- u - k theta, theta-hat = theta / (|theta| + eps).
SMES_HD double projection_cos(double gt, double gg, double tt, double eps) {
  const double gn = gg > 0.0 ? sqrt(gg) : 0.0, tn = tt > 0.0 ? sqrt(tt) : 0.0;
  return fabs(gt) / ((gn > eps ? gn : eps) * (tn > eps ? tn : eps));
}
SMES_HD double projection_k(double tt, double tu, double eps) {
  const double tn = (tt > 0.0 ? sqrt(tt) : 0.0) + eps;
  return tu / (tn * tn);
}

// The decision for one tensor of `rows` rows of `len` elements from its row sums st[4 r + c]:
// per output channel, then per layer, max |cos| < delta / sqrt(row length) projects. Writes k[r]
// (0: no projection) and returns whether it projects.
SMES_HD bool projection_coefficients(const double* st, int64_t rows, int64_t len, double delta,
                                     double eps, float* k) {
  double max_cos = 0.0, gt = 0.0, gg = 0.0, tt = 0.0, tu = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const double* x = st + 4 * r;
    const double c = projection_cos(x[0], x[1], x[2], eps);
    max_cos = (c > max_cos || c != c) ? c : max_cos;  // NaN: no projection, as torch's max
    gt += x[0];
    gg += x[1];
    tt += x[2];
    tu += x[3];
  }
  if (max_cos < delta / sqrt((double)len)) {
    for (int64_t r = 0; r < rows; ++r) k[r] = (float)projection_k(st[4 * r + 2], st[4 * r + 3], eps);
    return true;
  }
  const bool layer = projection_cos(gt, gg, tt, eps) < delta / sqrt((double)(rows * len));
  const double kl = layer ? projection_k(tt, tu, eps) : 0.0;
  for (int64_t r = 0; r < rows; ++r) k[r] = (float)kl;
  return layer;
}

}  // namespace smes
