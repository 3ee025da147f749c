// The CPU kernel body, included once per instruction set by smes_cpu_{avx512,avx2,base}.cpp after
// they set `#pragma GCC target(...)`, SMES_W (floats per vector) and SMES_ISA_NS. Everything here
// has internal linkage and includes nothing but builtins, so no inline function compiled for a
// wider ISA can be picked by the linker for a narrower one.
//
// Values are GCC vectors of SMES_W floats; `smes_update` (smes_math.h) is the element rule.
// (v/bc2)^p is our own vectorised 2^(p log2 v - p log2 bc2) (pow_hat below): relative error
// below 1e-6 over the whole float range (test_power_accuracy), with v = 0, denormals, inf and
// NaN handled as SPEC §1 requires.

#ifndef SMES_W
#error "define SMES_W before including smes_cpu_kernel.h"
#endif

namespace smes {
namespace cpu {
namespace SMES_ISA_NS {
namespace {

constexpr int W = SMES_W;
typedef float V __attribute__((vector_size(4 * W)));
typedef int32_t VI __attribute__((vector_size(4 * W)));
typedef uint32_t VU __attribute__((vector_size(4 * W)));
typedef uint16_t VH __attribute__((vector_size(2 * W)));
typedef _Float16 VF16 __attribute__((vector_size(2 * W)));

#define SMES_CPU_INLINE static inline __attribute__((always_inline))

SMES_CPU_INLINE V splat(float x) { return V{} + x; }

struct VecMath {
  SMES_CPU_INLINE V sqrt(V x) {
#if defined(SMES_SQRT)
    return SMES_SQRT(x);
#else
    V r;
    for (int i = 0; i < W; ++i) r[i] = __builtin_sqrtf(x[i]);
    return r;
#endif
  }
  // max(a, b) that propagates NaN from either side, as torch.maximum does.
  SMES_CPU_INLINE V max_nan(V a, V b) { return (a < b || b != b) ? b : a; }

#if SMES_W == 16
  // AVX-512: getexp/getmant split any input (denormals, 0, inf, NaN included) and scalef scales
  // with correct overflow and underflow, so neither function needs special-case code.
  // log2 x = e + l: e integral (exact, -inf at 0), l = log2(mant) with mant in [0.75, 1.5).
  SMES_CPU_INLINE void log2_split(V x, V& e_out, V& l_out) {
    const __m512 mant = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero);
    __m512 e = _mm512_getexp_ps(x);  // floor(log2 x); -inf at 0, inf at inf
    e = _mm512_mask_add_ps(e, _mm512_cmp_ps_mask(mant, splat(1.0f), _CMP_LT_OQ), e, splat(1.0f));
    const V f = (V)mant - 1.0f;  // [-0.25, 0.5), exact
    // s = f / (2 + f) by rcp14 and one Newton step (relative error ~1e-7, no vdivps)
    const __m512 d = splat(2.0f) + f;
    const __m512 r0 = _mm512_rcp14_ps(d);
    const V r = (V)r0 * (V)_mm512_fnmadd_ps(d, r0, splat(2.0f));
    const V s = f * r;  // |s| <= 0.2
    const V z = s * s;  // <= 0.04
    // log2(1+f) = 2 log2(e) atanh(s) = s Q(z): Q fitted on [0, 0.04], relative error 7e-9
    V q = splat(0.43643745f);
    q = q * z + 0.57653243f;
    q = q * z + 0.96180052f;
    q = q * z + 2.88539008f;
    e_out = (V)e;
    l_out = s * q;
  }
  SMES_CPU_INLINE V quot(V m, V d) { return m / d; }
  // 2^(hi + lo) for |lo| small against the rounding of hi + lo: n = round(hi + lo) and the
  // fraction f = (hi - n) + lo (hi - n is exact), so the sum is never rounded to float.
  // No clamps: scalef gives inf/0 for any n out of range, and +-inf for n = +-inf (v = 0 or
  // inf, where f is NaN: vmaxps/vminps replace a NaN first operand by the second); a NaN v
  // makes n NaN, which scalef propagates.
  SMES_CPU_INLINE V exp2_2(V hi, V lo) {
    const __m512 n = _mm512_roundscale_ps(hi + lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = (hi - (V)n) + lo;  // about [-0.5, 0.5]
    f = _mm512_min_ps(_mm512_max_ps(f, splat(-1.0f)), splat(1.0f));
    const V fv = f;
    // 2^f on [-0.5, 0.5]: degree 5 fitted for relative error, 8e-8
    V p = splat(1.3266970e-03f);
    p = p * fv + 9.6754597e-03f;
    p = p * fv + 5.5507426e-02f;
    p = p * fv + 2.4022122e-01f;
    p = p * fv + 6.9314695e-01f;
    p = p * fv + 1.0000001f;
    return _mm512_scalef_ps(p, n);
  }
#else
  // log2 x = e + l: e integral (exact; -inf at 0, x itself at inf/NaN), l = log2(mant), mant in
  // [sqrt(1/2), sqrt(2)). Inputs are v >= 0 or NaN (v = beta2 v + (1 - beta2) g^2).
  SMES_CPU_INLINE void log2_split(V x, V& e_out, V& l_out) {
    const VI tiny = x < 1.17549435e-38f;      // zero and denormal inputs
    const V xs = tiny ? x * 8388608.0f : x;   // 2^23 brings denormals into the normal range
    const VI bits = (VI)xs;
    VI e = ((bits >> 23) & 0xff) - 127 - (tiny & 23);
    V mant = (V)((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
    const VI big = mant > 1.41421356f;
    mant = big ? mant * 0.5f : mant;  // [sqrt(1/2), sqrt(2))
    e = e - big;                       // big is -1 where true
    const V f = mant - 1.0f;           // exact (Sterbenz)
    const V s = f / (2.0f + f);        // |s| < 0.172
    const V z = s * s;                 // < 0.0295
    // log2(1+f) = 2 log2(e) atanh(s) = s Q(z): Q fitted on [0, 0.0295], relative error 2e-9
    V q = splat(0.43040139f);
    q = q * z + 0.57676542f;
    q = q * z + 0.96179838f;
    q = q * z + 2.88539008f;
    V ev = __builtin_convertvector(e, V);
    V l = s * q;
    ev = (x == 0.0f) ? splat(-__builtin_inff()) : ev;
    const VI special = !(x < __builtin_inff());  // inf, NaN
    ev = special ? x : ev;
    l = (x == 0.0f || special) ? splat(0.0f) : l;
    e_out = ev;
    l_out = l;
  }

  SMES_CPU_INLINE V quot(V m, V d) { return m / d; }
  // 2^(hi + lo), the sum never rounded to float (see the AVX-512 version).
  SMES_CPU_INLINE V exp2_2(V hi, V lo) {
    V t = hi + lo;
    t = (t < -151.0f) ? splat(-151.0f) : t;  // 2^-151 rounds to 0; NaN passes through
    t = (t > 129.0f) ? splat(129.0f) : t;    // 2^129 overflows to inf
    const V magic = splat(12582912.0f);      // 1.5 * 2^23: round to nearest integer
    const V tm = t + magic;
    const VI n = (VI)tm - (VI)magic;
    const V f = (hi - (tm - magic)) + lo;  // about [-0.5, 0.5]
    // 2^f on [-0.5, 0.5]: degree 6 fitted for relative error, 2e-9
    V p = splat(1.5337577e-04f);
    p = p * f + 1.3399860e-03f;
    p = p * f + 9.6185195e-03f;
    p = p * f + 5.5503290e-02f;
    p = p * f + 2.4022647e-01f;
    p = p * f + 6.9314721e-01f;
    p = p * f + 1.0f;
    const VI n1 = n >> 1;  // two power-of-two factors keep each exponent in the normal range
    const VI n2 = n - n1;
    const V r = (p * (V)((n1 + 127) << 23)) * (V)((n2 + 127) << 23);
    return (hi == __builtin_inff()) ? splat(__builtin_inff())
                                    : ((hi == -__builtin_inff()) ? splat(0.0f) : r);
  }
#endif

  // (v / bc2)^p = 2^(p log2 v - p log2 bc2). With log2 v = e + l (e integral, |e| <= 150) and
  // p = p_hi + p_lo (p_hi of 12 bits), p_hi * e is exact, so the exponent is carried as
  // hi + lo without rounding its large part: a few ulps over the whole float range.
  SMES_CPU_INLINE V pow_hat(V v, const Scalars& s) {
    V e, l;
    log2_split(v, e, l);
    const V hi = s.p_hi * e;
#if SMES_W == 16
    // e = +-inf (v = 0 or inf) is carried by hi alone; lo stays finite (NaN e becomes 0 here
    // and still propagates through hi)
    const V ec = _mm512_min_ps(_mm512_max_ps(e, splat(-200.0f)), splat(200.0f));
#else
    const V ec = e;  // exp2_2 checks hi for +-inf itself
#endif
    const V lo = s.p_lo * ec + (s.p * l + s.log2_shift);
    return exp2_2(hi, lo);
  }
};

// Loads and stores of W elements, converting to and from float32.
SMES_CPU_INLINE V load(const float* p) {
  V r;
  __builtin_memcpy(&r, p, sizeof r);
  return r;
}
SMES_CPU_INLINE void store(float* p, V x) { __builtin_memcpy(p, &x, sizeof x); }

struct bf16 { uint16_t x; };
struct f16 { uint16_t x; };

SMES_CPU_INLINE V load(const bf16* p) {
  VH h;
  __builtin_memcpy(&h, p, sizeof h);
  return (V)(__builtin_convertvector(h, VU) << 16);
}
SMES_CPU_INLINE void store(bf16* p, V x) {
  // round to nearest even; NaN stays a quiet NaN (as c10::BFloat16 does)
  VU u = (VU)x;
  u = u + 0x7fffu + ((u >> 16) & 1u);
  u = (x != x) ? (VU{} + 0x7fc00000u) : u;
  VH h = __builtin_convertvector(u >> 16, VH);
  __builtin_memcpy(p, &h, sizeof h);
}
SMES_CPU_INLINE V load(const f16* p) {
  VF16 h;
  __builtin_memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, V);
}
SMES_CPU_INLINE void store(f16* p, V x) {
  VF16 h = __builtin_convertvector(x, VF16);
  __builtin_memcpy(p, &h, sizeof h);
}

// Partial vectors for the tail of a segment: zero-padded lanes are computed and dropped.
template <class T>
SMES_CPU_INLINE V load_n(const T* p, int n) {
  T buf[W] = {};
  __builtin_memcpy(buf, p, n * sizeof(T));
  return load(buf);
}
template <class T>
SMES_CPU_INLINE void store_n(T* p, V x, int n) {
  T buf[W];
  store(buf, x);
  __builtin_memcpy(p, buf, n * sizeof(T));
}

// Software prefetch distance in elements (0: off). Measured on an AMD EPYC (Zen 4): 256, 512
// and 2048 were all slower than the hardware prefetcher alone.
#ifndef SMES_PREFETCH
#define SMES_PREFETCH 0
#endif
constexpr int kPrefetch = SMES_PREFETCH;

template <class P, class S, int PC, bool TV, bool AMS, bool L2>
void segment(const TensorJob& j, int64_t lo, int64_t hi) {
  if constexpr (PC != P_ZERO && !TV) {
    return;  // rejected by the binding: p != 0 needs v
  } else {
    P* __restrict__ pp = static_cast<P*>(j.p) + lo;
    const P* __restrict__ gp = static_cast<const P*>(j.g) + lo;
    S* __restrict__ mp = static_cast<S*>(j.m) + lo;
    S* __restrict__ vp = TV ? static_cast<S*>(j.v) + lo : nullptr;
    S* __restrict__ xp = AMS ? static_cast<S*>(j.vmax) + lo : nullptr;
    const Scalars s = j.s;
    const int64_t n = hi - lo;
    int64_t i = 0;
    V v = {}, x = {};
    // Two vectors per iteration: two independent dependency chains (the general-p chain is
    // about 140 cycles long) keep the out-of-order window busy.
    for (; i + 2 * W <= n; i += 2 * W) {
      if (kPrefetch > 0) {
        __builtin_prefetch(pp + i + kPrefetch, 1);
        __builtin_prefetch(gp + i + kPrefetch, 0);
        __builtin_prefetch(mp + i + kPrefetch, 1);
        if (TV) __builtin_prefetch(vp + i + kPrefetch, 1);
        if (AMS) __builtin_prefetch(xp + i + kPrefetch, 1);
      }
      V th0 = load(pp + i), g0 = load(gp + i), m0 = load(mp + i);
      V th1 = load(pp + i + W), g1 = load(gp + i + W), m1 = load(mp + i + W);
      V v1 = {}, x1 = {};
      if (TV) v = load(vp + i), v1 = load(vp + i + W);
      if (AMS) x = load(xp + i), x1 = load(xp + i + W);
      smes_update<PC, TV, AMS, L2, VecMath>(th0, g0, m0, v, x, s);
      smes_update<PC, TV, AMS, L2, VecMath>(th1, g1, m1, v1, x1, s);
      store(pp + i, th0);
      store(pp + i + W, th1);
      store(mp + i, m0);
      store(mp + i + W, m1);
      if (TV) store(vp + i, v), store(vp + i + W, v1);
      if (AMS) store(xp + i, x), store(xp + i + W, x1);
    }
    for (; i + W <= n; i += W) {
      if (kPrefetch > 0) {  // the hardware prefetcher alone leaves the math exposed
        __builtin_prefetch(pp + i + kPrefetch, 1);
        __builtin_prefetch(gp + i + kPrefetch, 0);
        __builtin_prefetch(mp + i + kPrefetch, 1);
        if (TV) __builtin_prefetch(vp + i + kPrefetch, 1);
        if (AMS) __builtin_prefetch(xp + i + kPrefetch, 1);
      }
      V th = load(pp + i), g = load(gp + i), m = load(mp + i);
      if (TV) v = load(vp + i);
      if (AMS) x = load(xp + i);
      smes_update<PC, TV, AMS, L2, VecMath>(th, g, m, v, x, s);
      store(pp + i, th);
      store(mp + i, m);
      if (TV) store(vp + i, v);
      if (AMS) store(xp + i, x);
    }
    if (i < n) {
      const int r = (int)(n - i);
      V th = load_n(pp + i, r), g = load_n(gp + i, r), m = load_n(mp + i, r);
      if (TV) v = load_n(vp + i, r);
      if (AMS) x = load_n(xp + i, r);
      smes_update<PC, TV, AMS, L2, VecMath>(th, g, m, v, x, s);
      store_n(pp + i, th, r);
      store_n(mp + i, m, r);
      if (TV) store_n(vp + i, v, r);
      if (AMS) store_n(xp + i, x, r);
    }
  }
}

// Variant dispatch, once per (tensor, thread) segment.
template <class P, class S, int PC, bool TV, bool AMS>
void by_l2(const TensorJob& j, int64_t lo, int64_t hi) {
  if (j.code & kL2)
    segment<P, S, PC, TV, AMS, true>(j, lo, hi);
  else
    segment<P, S, PC, TV, AMS, false>(j, lo, hi);
}
template <class P, class S, int PC>
void by_state(const TensorJob& j, int64_t lo, int64_t hi) {
  if (!(j.code & kTrackV))
    by_l2<P, S, PC, false, false>(j, lo, hi);
  else if (j.code & kAmsgrad)
    by_l2<P, S, PC, true, true>(j, lo, hi);
  else
    by_l2<P, S, PC, true, false>(j, lo, hi);
}
template <class P, class S>
void by_pclass(const TensorJob& j, int64_t lo, int64_t hi) {
  switch (j.code & kPClassMask) {
    case P_ZERO: by_state<P, S, P_ZERO>(j, lo, hi); break;
    case P_HALF: by_state<P, S, P_HALF>(j, lo, hi); break;
    default: by_state<P, S, P_GENERAL>(j, lo, hi); break;
  }
}
void dispatch(const TensorJob& j, int64_t lo, int64_t hi) {
  switch (j.pdt * 3 + j.sdt) {
    case F32 * 3 + F32: by_pclass<float, float>(j, lo, hi); break;
    case BF16 * 3 + F32: by_pclass<bf16, float>(j, lo, hi); break;
    case F16 * 3 + F32: by_pclass<f16, float>(j, lo, hi); break;
    case BF16 * 3 + BF16: by_pclass<bf16, bf16>(j, lo, hi); break;
    case F16 * 3 + F16: by_pclass<f16, f16>(j, lo, hi); break;
    default: break;  // rejected by the binding
  }
}

void roofline_segment(const TensorJob& j, int64_t lo, int64_t hi) {
  float* __restrict__ pp = static_cast<float*>(j.p) + lo;
  const float* __restrict__ gp = static_cast<const float*>(j.g) + lo;
  float* __restrict__ mp = static_cast<float*>(j.m) + lo;
  float* __restrict__ vp = static_cast<float*>(j.v) + lo;
  const float a = j.s.step_size;
  const int64_t n = hi - lo;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    if (kPrefetch > 0) {  // as the step kernel does
      __builtin_prefetch(pp + i + kPrefetch, 1);
      __builtin_prefetch(gp + i + kPrefetch, 0);
      __builtin_prefetch(mp + i + kPrefetch, 1);
      __builtin_prefetch(vp + i + kPrefetch, 1);
    }
    V g = load(gp + i);
    store(pp + i, load(pp + i) - a * g);
    store(mp + i, load(mp + i) + g);
    store(vp + i, load(vp + i) + g);
  }
  for (; i < n; ++i) {
    pp[i] -= a * gp[i];
    mp[i] += gp[i];
    vp[i] += gp[i];
  }
}

// Walk the jobs overlapping [begin, end) of the concatenated element space.
template <void (*Seg)(const TensorJob&, int64_t, int64_t)>
void run_range(const TensorJob* jobs, const int64_t* starts, int n, int64_t begin, int64_t end) {
  int lo = 0, hi = n;  // first job whose range contains `begin`: starts[k] <= begin < starts[k+1]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (starts[mid] <= begin) lo = mid; else hi = mid;
  }
  for (int k = lo; k < n && starts[k] < end; ++k) {
    const int64_t a = begin > starts[k] ? begin : starts[k];
    const int64_t b = end < starts[k + 1] ? end : starts[k + 1];
    if (a < b) Seg(jobs[k], a - starts[k], b - starts[k]);
  }
}

}  // namespace
}  // namespace SMES_ISA_NS
}  // namespace cpu
}  // namespace smes
