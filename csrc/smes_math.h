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

// Flags column of the host hyperparameter table (see csrc/smes_cpu.cpp).
constexpr int kFlagBiasCorrection = 1;
constexpr int kFlagDecoupled = 2;
constexpr int kFlagAmsgrad = 4;
constexpr int kFlagMaximize = 8;
constexpr int kFlagTrackV = 16;

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
};

// The float64 host (or device) part: bias corrections and the hoisted scalars.
// bc1 = 1 - beta1^t, bc2 = 1 - beta2^t in float64, both 1 without bias correction.
template <class PowFn, class SqrtFn, class Log2Fn>
SMES_HD Scalars make_scalars(double lr, double beta1, double beta2, double eps, double p,
                             double wd, int flags, double step, float inv_scale, PowFn pw,
                             SqrtFn sq, Log2Fn lg) {
  Scalars s;
  double bc1 = 1.0, bc2 = 1.0;
  if (flags & kFlagBiasCorrection) {
    bc1 = 1.0 - pw(beta1, step);
    bc2 = 1.0 - pw(beta2, step);
  }
  s.beta1 = (float)beta1;
  s.omb1 = (float)(1.0 - beta1);
  s.beta2 = (float)beta2;
  s.omb2 = (float)(1.0 - beta2);
  s.gmul = (flags & kFlagMaximize) ? -inv_scale : inv_scale;
  const bool decoupled = (flags & kFlagDecoupled) != 0;
  s.l2 = decoupled ? 0.f : (float)wd;
  s.decay = (decoupled && wd != 0.0) ? (float)(1.0 - lr * wd) : 1.f;
  s.step_size = (float)(lr / bc1);
  s.eps = (float)eps;
  s.d0 = (float)(1.0 + eps);
  s.bc2_sqrt = (float)sq(bc2);
  s.p = (float)p;
  s.log2_shift = (float)(-p * lg(bc2));
  s.bc2_pow = (float)pw(bc2, -p);
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

// One SMES step on one value (element or SIMD register). `v`/`vmax` are only touched when the
// variant tracks them; with P_ZERO, v is updated when tracked (exponent schedules) but not read
// for the denominator. `s`: Scalars, or a kernel's extension of it with constants of its own
// (derived from Scalars once per tensor) that M's functions read.
template <int PC, bool TV, bool AMS, bool L2, class M, class T, class S>
SMES_HD void smes_update(T& th, T g, T& m, T& v, T& vmax, const S& s) {
  g = g * s.gmul;                  // maximize, then 1/grad_scale (both exact when 1)
  if (L2) g = g + s.l2 * th;       // L2: g + lambda * theta
  th = th * s.decay;               // decoupled: theta * (1 - lr * lambda); exact when 1
  m = s.beta1 * m + s.omb1 * g;
  T vv;
  if (TV) {
    v = s.beta2 * v + s.omb2 * (g * g);
    vv = v;
    if (AMS) {
      vmax = M::max_nan(vmax, v);
      vv = vmax;
    }
  }
  if (PC == P_ZERO) {
    th = th - s.step_size * (m / s.d0);
  } else if (PC == P_HALF) {
    // torch.optim.AdamW's order: sqrt(v) / sqrt(bc2) + eps
    T d = M::sqrt(vv) / s.bc2_sqrt + s.eps;
    th = th - s.step_size * (m / d);
  } else {
    // (v/bc2)^p; v = 0, p < 0 gives inf, so the update is 0
    T d = M::pow_hat(vv, s) + s.eps;
    th = th - s.step_size * M::quot(m, d);  // m / d
  }
}

}  // namespace smes
