// The CPU kernel body, included once per instruction set by smes_cpu_{avx512,avx2,base}.cpp after
// they set `#pragma GCC target(...)`, SMES_W (floats per vector) and SMES_ISA_NS. Everything here
// has internal linkage and includes nothing but builtins, so no inline function compiled for a
// wider ISA can be picked by the linker for a narrower one.
//
// Values are GCC vectors of SMES_W floats (on AVX2 at general p, blocks of several such vectors);
// `smes_update` (smes_math.h) is the element rule. (v/bc2)^p is our own vectorised
// 2^(p log2 v - p log2 bc2) (pow_hat below): relative error of the update below 2e-6 for
// |p| <= 1 over the whole float range, denormal v included (test_power_accuracy and
// test_power_accuracy_whole_float_range), with v = 0, inf and NaN handled as SPEC §1 requires.

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
  // The element-wise functions take V or, where segment passes a block of several vectors (AVX2
  // at general p), a GCC vector of several V: `each` applies an operation on V to every piece.
  template <class T, class Fn>
  SMES_CPU_INLINE T each(Fn fn, T a) {
    constexpr int K = sizeof(T) / sizeof(V);
    V x[K];
    __builtin_memcpy(x, &a, sizeof a);
    for (int i = 0; i < K; ++i) x[i] = fn(x[i]);
    T r;
    __builtin_memcpy(&r, x, sizeof r);
    return r;
  }
  template <class T, class Fn>
  SMES_CPU_INLINE T each(Fn fn, T a, T b) {
    constexpr int K = sizeof(T) / sizeof(V);
    V x[K], y[K];
    __builtin_memcpy(x, &a, sizeof a);
    __builtin_memcpy(y, &b, sizeof b);
    for (int i = 0; i < K; ++i) x[i] = fn(x[i], y[i]);
    T r;
    __builtin_memcpy(&r, x, sizeof r);
    return r;
  }
  template <class T, class Fn>
  SMES_CPU_INLINE T each(Fn fn, T a, T b, T c) {
    constexpr int K = sizeof(T) / sizeof(V);
    V x[K], y[K], z[K];
    __builtin_memcpy(x, &a, sizeof a);
    __builtin_memcpy(y, &b, sizeof b);
    __builtin_memcpy(z, &c, sizeof c);
    for (int i = 0; i < K; ++i) x[i] = fn(x[i], y[i], z[i]);
    T r;
    __builtin_memcpy(&r, x, sizeof r);
    return r;
  }

  template <class T>
  SMES_CPU_INLINE T sqrt(T x) {
#if defined(SMES_SQRT)
    return each([](V a) __attribute__((always_inline)) { return (V)SMES_SQRT(a); }, x);
#else
    T r;
    for (int i = 0; i < (int)(sizeof(T) / 4); ++i) r[i] = __builtin_sqrtf(x[i]);
    return r;
#endif
  }
  // max(a, b) that propagates NaN from either side, as torch.maximum does.
  template <class T>
  SMES_CPU_INLINE T max_nan(T a, T b) {
    return each([](V x, V y) __attribute__((always_inline)) {
      return (x < y || y != y) ? y : x;
    }, a, b);  // fmt: skip
  }

#if SMES_W == 16
  // AVX-512: getexp/getmant split any input (denormals, 0, inf, NaN included), scalef scales with
  // correct overflow and underflow, and two 32-entry tables (vpermt2ps) shorten both polynomials.
  // The FMA pipes are the bottleneck here, so table lookups (shuffle pipe) replace FMAs.
  //
  // Tables, for k = 0..31 (python: c = 1 + (k + .5) / 32; kRcp[k] = float32(1 / c);
  // kLog[k] = float32(-log2(kRcp[k])); kExp[k] = float32(2 ** (k / 32))):
  alignas(64) static constexpr float kRcp[32] = {
      0.98461538553f, 0.95522385836f, 0.92753624916f, 0.90140843391f, 0.87671232224f,
      0.85333335400f, 0.83116883039f, 0.81012660265f, 0.79012346268f, 0.77108430862f,
      0.75294119120f, 0.73563218117f, 0.71910113096f, 0.70329672098f, 0.68817204237f,
      0.67368423939f, 0.65979379416f, 0.64646464586f, 0.63366335630f, 0.62135922909f,
      0.60952383280f, 0.59813082218f, 0.58715593815f, 0.57657659054f, 0.56637167931f,
      0.55652171373f, 0.54700857401f, 0.53781515360f, 0.52892559767f, 0.52032518387f,
      0.51200002432f, 0.50393700600f};
  alignas(64) static constexpr float kLog[32] = {
      0.02236781083f, 0.06608922035f, 0.10852442682f, 0.14974714816f, 0.18982456625f,
      0.22881865501f, 0.26678654552f, 0.30378070474f, 0.33984997869f, 0.37503948808f,
      0.40939089656f, 0.44294351339f, 0.47573342919f, 0.50779461861f, 0.53915882111f,
      0.56985557079f, 0.59991288185f, 0.62935662270f, 0.65821152925f, 0.68650048971f,
      0.71424543858f, 0.74146705866f, 0.76818436384f, 0.79441583157f, 0.82017898560f,
      0.84549009800f, 0.87036466599f, 0.89481770992f, 0.91886329651f, 0.94251453877f,
      0.96578419209f, 0.98868471384f};
  alignas(64) static constexpr float kExp[32] = {
      1.0f,           1.02189719677f, 1.04427373409f, 1.06714046001f, 1.09050774574f,
      1.11438679695f, 1.13878858089f, 1.16372489929f, 1.18920707703f, 1.21524739265f,
      1.24185776710f, 1.26905095577f, 1.29683959484f, 1.32523667812f, 1.35425555706f,
      1.38390994072f, 1.41421353817f, 1.44518077373f, 1.47682619095f, 1.50916445255f,
      1.54221081734f, 1.57598090172f, 1.61049032211f, 1.64575552940f, 1.68179285526f,
      1.71861934662f, 1.75625216961f, 1.79470908642f, 1.83400809765f, 1.87416768074f,
      1.91520655155f, 1.95714414120f};
  SMES_CPU_INLINE __m512 lookup(const float* t, __m512i k) {  // t[k & 31]
    return _mm512_permutex2var_ps(_mm512_load_ps(t), k, _mm512_load_ps(t + 16));
  }
  // vfixupimmps table: NaN -> +0 (class QNaN, response 8); every other class keeps its value.
  SMES_CPU_INLINE __m512 nan_to_zero(__m512 x) {
    return _mm512_fixupimm_ps(x, x, _mm512_set1_epi32(0x00000008), 0);
  }
  // The exponent p log2(v / bc2) in two parts: e = floor(log2 v) (exact; -inf at 0, inf at inf)
  // and t = p l + shift, with l = log2(mant), mant in [1, 2): l = kLog[k] + log2(1 + f),
  // f = mant * kRcp[k] - 1 (|f| < 0.0154, one rounding) for k the top 5 mantissa bits, and
  // log2(1 + f) = f (c1 + c2 f) (absolute error 4.4e-7). p and shift = -p log2 bc2 are folded into
  // the table (p kLog[k] + shift) and the coefficients (p c1, p c2): loop invariants, so t costs
  // no more than l.
  SMES_CPU_INLINE void log2_scaled(V x, const Scalars& s, V& e_out, V& t_out) {
    const __m512 mant = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
    const __m512i k = _mm512_srli_epi32(_mm512_castps_si512(mant), 18);  // bits 4..0 used
    const V f = _mm512_fmsub_ps(mant, lookup(kRcp, k), splat(1.0f));
    const V q = f * (s.p * -0.7214267f) + (s.p * 1.4427804f);
    const __m512 p = splat(s.p), shift = splat(s.log2_shift);
    const __m512 tab0 = _mm512_fmadd_ps(p, _mm512_load_ps(kLog), shift);
    const __m512 tab1 = _mm512_fmadd_ps(p, _mm512_load_ps(kLog + 16), shift);
    e_out = (V)_mm512_getexp_ps(x);
    t_out = f * q + (V)_mm512_permutex2var_ps(tab0, k, tab1);
  }
  SMES_CPU_INLINE V quot(V m, V d) { return m / d; }
  // 2^(r + f) for r a multiple of 1/32 and |f| <= 1/64 (plus a rounding): 2^floor(r) *
  // kExp[32 r mod 32] * 2^f with 2^f = 1 + f (c1 + c2 f) (relative error 5.5e-8). No clamps:
  // scalef gives inf/0 for any r out of range and for r = +-inf; a NaN r stays NaN.
  SMES_CPU_INLINE V exp2_rf(__m512 r, V f) {
    // r + 1.5 * 2^18 has an ulp of 1/32: its low 5 bits are 32 r mod 32 (for |r| < 2^17; beyond,
    // scalef saturates whatever the table gives)
    const __m512i k = _mm512_castps_si512(_mm512_add_ps(r, splat(393216.0f)));
    const V t = lookup(kExp, k);
    const V q = f * 0.24022706f + 0.69315755f;
    return _mm512_scalef_ps((t * f) * q + t, r);
  }
#elif SMES_W == 8
  // AVX2 + FMA: the AVX-512 scheme with 8-entry tables (vpermps) and degree-3 polynomials, which
  // the smaller tables need for the same accuracy. AVX2 has no getexp/getmant/scalef/fixupimm:
  // denormals are normalised through an integer conversion, 2^n is built from the exponent bits
  // (squared, so that denormal and overflowing results round once, as scalef does), and v = 0,
  // inf and NaN take their result from one blend at the end. The FMA pipes (two, shared with
  // multiplies, blends and the divider) bound the kernel, so the rest is integer and add work.
  // pow_hat is written for a block of K vectors (segment passes K = 4): each generic operation
  // becomes K independent instructions in a row, which the out-of-order core overlaps; one
  // vector's chain (about 60 instructions, 100+ cycles with the update) leaves it idle.
  //
  // Tables, for k = 0..7 (python: c = 1 + (k + .5) / 8; kRcp8[k] = float32(1 / c);
  // kLog8[k] = float32(-log2(kRcp8[k])); kExp8[k] = float32(2 ** (k / 4))):
  alignas(32) static constexpr float kRcp8[8] = {
      0.94117647409f, 0.84210526943f, 0.76190477610f, 0.69565218687f,
      0.63999998569f, 0.59259259701f, 0.55172413588f, 0.51612901688f};
  alignas(32) static constexpr float kLog8[8] = {
      0.08746283501f, 0.24792750180f, 0.39231738448f, 0.52356195450f,
      0.64385622740f, 0.75488746166f, 0.85798102617f, 0.95419633389f};
  alignas(32) static constexpr float kExp8[8] = {
      1.00000000000f, 1.18920707703f, 1.41421353817f, 1.68179285526f,
      2.00000000000f, 2.37841415405f, 2.82842707634f, 3.36358571053f};
  template <class T>
  SMES_CPU_INLINE T lookup(__m256 tab, T k) {  // tab[bits 2..0 of k], k holding integers
    return each([tab](V x) __attribute__((always_inline)) {
      return (V)_mm256_permutevar8x32_ps(tab, _mm256_castps_si256(x));
    }, k);  // fmt: skip
  }
  // a b + c with one rounding, a or c a scalar (splat inside: a wide splat built outside the
  // loop would be built element by element where GCC does not hoist it)
  template <class T>
  SMES_CPU_INLINE T fma(float a, T b, T c) {
    return each([a](V y, V z) __attribute__((always_inline)) {
      return (V)_mm256_fmadd_ps(_mm256_set1_ps(a), y, z);
    }, b, c);  // fmt: skip
  }
  template <class T>
  SMES_CPU_INLINE T fma(T a, T b, float c) {
    return each([c](V x, V y) __attribute__((always_inline)) {
      return (V)_mm256_fmadd_ps(x, y, _mm256_set1_ps(c));
    }, a, b);  // fmt: skip
  }
  // The exponent's constant part, shift - 127 p (shift = -p log2 bc2; 127 p: the exponent bias,
  // so that the biased exponent field converts straight to e), as hi + lo: hi, a multiple of 1/4,
  // joins the rounding constant and lo (|lo| <= 1/8) the log2 table, so that t stays below
  // |p| + 1/4 and each of its roundings costs 3e-8 of the exponent (5e-7 at |shift| ~ 10).
  struct Shift {
    float hi, lo;
  };
  SMES_CPU_INLINE Shift split_shift(const Scalars& s) {
    const double c = (double)s.log2_shift - 127.0 * (double)s.p;  // exact
    const double hi = __builtin_rint(c * 4.0) * 0.25;
    return {(float)hi, (float)(c - hi)};
  }
  // kMagic = 1.5 * 2^21 + 254: r + kMagic has an ulp of 1/4 for |r| < 2^20, and its bits 11..2
  // are n + 254 for n = floor(r) (bits 1..0: 4 r mod 4).
  static constexpr float kMagic = 3145982.0f;
  template <class T>
  SMES_CPU_INLINE T quot(T m, T d) { return m / d; }

  // (v / bc2)^p = 2^(p (e - 127) + p l + shift) for v = mant 2^(e - 127) > 0:
  // - log2: e the biased exponent field (exact), l = log2(mant) = kLog8[k] + log2(1 + f),
  //   f = mant * kRcp8[k] - 1 (|f| < 0.059, one rounding) for k the top 3 mantissa bits,
  //   log2(1 + f) = f (c1 + c2 f + c3 f^2) (absolute error 7.5e-7); t = p l + lo with p and lo
  //   folded into the table and the coefficients.
  // - r: p e + t rounded, then (with hi) rounded to a multiple of 1/4 by the magic-number add; the
  //   fraction f = (p e - r) + t takes p e - r from one FMA, whose result (about -t) is small.
  // - 2^r 2^f = kExp8[4 (r mod 2)] s^2 2^f with s = 2^floor(n / 2), both read from the bits of
  //   r + kMagic, and 2^f = 1 + f (c1 + c2 f + c3 f^2) (relative error 4.3e-7). r is clamped to
  //   [-152, 129], where the result rounds to 0 or overflows to inf; s stays normal, so only the
  //   last product rounds to a denormal or to inf.
  // - v = 0, inf, NaN (and any negative v, which v never is): v itself for p > 0; for p < 0 the
  //   bits 0x7f800000 - v (0 <-> inf, a NaN stays a NaN), as ~v + 0x7f800001.
  template <class T>
  SMES_CPU_INLINE T pow_hat(T v, const Scalars& s) {
    // Comparisons, blends, min/max and conversions go through `each` (GCC would split them on a
    // wide vector into single elements); the integer arithmetic is plain vector code.
    typedef uint32_t TU __attribute__((vector_size(sizeof(T))));
    const Shift sh = split_shift(s);
    // log2. Denormals (bits below 2^23, and 0): the bits b convert exactly to b = v 2^149; less
    // 149 in the exponent field they are those of 2^23 v with 23 taken off the exponent field,
    // which then reads -22..0 while the mantissa field is that of a normal number.
    const T bits = each([](V x) __attribute__((always_inline)) {
      const __m256i b = _mm256_castps_si256(x);
      const __m256i conv = _mm256_castps_si256(_mm256_cvtepi32_ps(b));
      const __m256i scaled = _mm256_sub_epi32(conv, _mm256_set1_epi32(149 << 23));
      const __m256i tiny = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x00800000), b);
      return (V)_mm256_blendv_ps(x, _mm256_castsi256_ps(scaled), _mm256_castsi256_ps(tiny));
    }, v);  // fmt: skip
    const TU ub = (TU)bits;
    const T mant = (T)((ub & 0x007fffffu) | 0x3f800000u);
    const T k = (T)(ub >> 20);  // bits 2..0 used: the top 3 mantissa bits
    const T f = fma(mant, lookup(_mm256_load_ps(kRcp8), k), -1.0f);
    T q = f * (s.p * 0.48230726f) + (s.p * -0.72239071f);
    q = f * q + (s.p * 1.4426936f);
    const __m256 tab = _mm256_fmadd_ps(splat(s.p), _mm256_load_ps(kLog8), splat(sh.lo));
    const T e = each([](V x) __attribute__((always_inline)) {  // the exponent field, -22..254
      return (V)_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_castps_si256(x), 23));
    }, bits);  // fmt: skip
    const T t = f * q + lookup(tab, k);
    // r and f
    const float magic = kMagic + sh.hi;  // exact: a multiple of 1/4 in [2^21, 2^22)
    const T rm = fma(s.p, e, t) + magic;
    const T fr = fma(s.p, e, magic - rm) + t;
    // 2^r 2^f, r clamped on the bits (positive floats order as their bits do)
    const T b = each([](V x) __attribute__((always_inline)) {
      const __m256i lo = _mm256_castps_si256(_mm256_set1_ps(kMagic - 152.0f));
      const __m256i hi = _mm256_castps_si256(_mm256_set1_ps(kMagic + 129.0f));
      return (V)_mm256_min_epi32(_mm256_max_epi32(_mm256_castps_si256(x), lo), hi);
    }, rm);  // fmt: skip
    const T te = lookup(_mm256_load_ps(kExp8), b);
    const T sc = (T)((((TU)b) >> 3) << 23);
    T qe = fr * 0.055523101f + 0.24035256f;
    qe = fr * qe + 0.69314718f;
    const T r = (((te * fr) * qe + te) * sc) * sc;
    // v = 0, inf, NaN: v is one of those where bits + 0x7fffffff (wrapping) is not below
    // 0xff7fffff as a signed integer, i.e. where bits is not in [1, 0x7f7fffff]
    const uint32_t neg = s.p < 0.0f ? 0xffffffffu : 0u;
    const T special = (T)((((TU)v) ^ neg) + (neg & 0x7f800001u));
    return each([](V x, V res, V sp) __attribute__((always_inline)) {
      const __m256i w = _mm256_add_epi32(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fffffff));
      const __m256i ordinary = _mm256_cmpgt_epi32(_mm256_set1_epi32(-8388609), w);
      return (V)_mm256_blendv_ps(sp, res, _mm256_castsi256_ps(ordinary));
    }, v, r, special);  // fmt: skip
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

#if SMES_W != 8  // AVX2: pow_hat above
  // (v / bc2)^p = 2^(p log2 v - p log2 bc2) = 2^(p e + t), e = floor(log2 v) integral
  // (|e| <= 150), never rounding the large part p e: a few ulps over the whole float range.
  SMES_CPU_INLINE V pow_hat(V v, const Scalars& s) {
#if SMES_W == 16
    // r: p e + t rounded, then rounded to a multiple of 1/32. The fraction f = (p e - r) + t takes
    // p e - r from one FMA, whose result (about -t) is small. v = 0 or inf: e = -+inf, r = -+inf
    // and f NaN, set to 0.
    V e, t;
    log2_scaled(v, s, e, t);
    const __m512 p = splat(s.p);
    const __m512 r = _mm512_roundscale_ps(_mm512_fmadd_ps(p, e, t),
                                          (5 << 4) | _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = nan_to_zero(_mm512_fmsub_ps(p, e, r) + t);
    return exp2_rf(r, f);
#else
    // p = p_hi + p_lo (p_hi of 12 bits): p_hi * e is exact, and the exponent is carried as hi + lo.
    V e, l;
    log2_split(v, e, l);
    const V hi = s.p_hi * e;
    const V lo = s.p_lo * e + (s.p * l + s.log2_shift);  // exp2_2 checks hi for +-inf itself
    return exp2_2(hi, lo);
#endif
  }
#endif
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

// theta to storage. bf16 params with stochastic rounding (j.sr; smes_math.h, sr_noise): the
// float32 bits plus 16 random bits, truncated (non-finite lanes round to nearest as store()).
SMES_CPU_INLINE VU mix32v(VU x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}
template <class P>
SMES_CPU_INLINE void store_theta(P* p, V x, const TensorJob&, int64_t) {
  store(p, x);
}
SMES_CPU_INLINE void store_theta(bf16* p, V x, const TensorJob& j, int64_t index) {
  if (!j.sr) {
    store(p, x);
    return;
  }
  VU lo, hi;
  for (int k = 0; k < W; ++k) {
    const uint64_t e = (uint64_t)index + (uint64_t)k;
    lo[k] = (uint32_t)e;
    hi[k] = (uint32_t)(e >> 32);
  }
  const VU r = mix32v((VU{} + j.sr_key) ^ lo ^ mix32v(hi)) & 0xFFFFu;
  const VU u = (VU)x;
  VU rn = u + 0x7fffu + ((u >> 16) & 1u);
  rn = (x != x) ? (VU{} + 0x7fc00000u) : rn;
  const VU res = ((u & 0x7f800000u) == 0x7f800000u) ? (rn >> 16) : ((u + r) >> 16);
  VH h = __builtin_convertvector(res, VH);
  __builtin_memcpy(p, &h, sizeof h);
}
template <class P>
SMES_CPU_INLINE void store_theta_n(P* p, V x, int n, const TensorJob& j, int64_t index) {
  P buf[W];
  store_theta(buf, x, j, index);
  __builtin_memcpy(p, buf, n * sizeof(P));
}

// Blocks of kBlock vectors as one GCC vector (segment, AVX2 at general p).
template <class VB, class T>
SMES_CPU_INLINE VB load_block(const T* p) {
  constexpr int K = sizeof(VB) / sizeof(V);
  V x[K];
  for (int k = 0; k < K; ++k) x[k] = load(p + k * W);
  VB r;
  __builtin_memcpy(&r, x, sizeof r);
  return r;
}
template <class VB, class T>
SMES_CPU_INLINE void store_block(T* p, VB b) {
  constexpr int K = sizeof(VB) / sizeof(V);
  V x[K];
  __builtin_memcpy(x, &b, sizeof b);
  for (int k = 0; k < K; ++k) store(p + k * W, x[k]);
}
#ifndef SMES_AVX2_BLOCK
#define SMES_AVX2_BLOCK 4
#endif
constexpr int kBlock = SMES_AVX2_BLOCK;

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
#if SMES_W == 8
    if constexpr (PC == P_GENERAL) {
      // AVX2, general p: kBlock vectors per call of the rule, as one wide GCC vector, so that
      // their dependency chains interleave instruction by instruction (see VecMath::pow_hat).
      typedef float VB __attribute__((vector_size(sizeof(V) * kBlock)));
      VB vb = {}, xb = {};
      for (; i + kBlock * W <= n; i += kBlock * W) {
        if (kPrefetch > 0) {
          __builtin_prefetch(pp + i + kPrefetch, 1);
          __builtin_prefetch(gp + i + kPrefetch, 0);
          __builtin_prefetch(mp + i + kPrefetch, 1);
          __builtin_prefetch(vp + i + kPrefetch, 1);
          if (AMS) __builtin_prefetch(xp + i + kPrefetch, 1);
        }
        VB th = load_block<VB>(pp + i), g = load_block<VB>(gp + i), m = load_block<VB>(mp + i);
        vb = load_block<VB>(vp + i);
        if (AMS) xb = load_block<VB>(xp + i);
        smes_update<PC, TV, AMS, L2, VecMath>(th, g, m, vb, xb, s);
        if (j.sr) {
          V x[kBlock];
          __builtin_memcpy(x, &th, sizeof th);
          for (int b = 0; b < kBlock; ++b) store_theta(pp + i + b * W, x[b], j, lo + i + b * W);
        } else {
          store_block(pp + i, th);
        }
        store_block(mp + i, m);
        store_block(vp + i, vb);
        if (AMS) store_block(xp + i, xb);
      }
    }
#endif
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
      store_theta(pp + i, th0, j, lo + i);
      store_theta(pp + i + W, th1, j, lo + i + W);
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
      store_theta(pp + i, th, j, lo + i);
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
      store_theta_n(pp + i, th, r, j, lo + i);
      store_n(mp + i, m, r);
      if (TV) store_n(vp + i, v, r);
      if (AMS) store_n(xp + i, x, r);
    }
  }
}

// The projection's two passes (SPEC §4), over the rows of a tensor (j.row_len elements each)
// that [lo, hi) touches. Stats: the moments are updated and stored (theta is not), and the row
// sums (g.theta, g.g, theta.theta, theta.u) are added to j.stats (double; rows a range boundary
// splits are shared by two threads, so atomically). Apply: u recomputed from the stored moments,
// u <- u - k_r theta, theta <- theta * decay - step_size * u.
SMES_CPU_INLINE double hsum(V x) {
  float b[W];
  __builtin_memcpy(b, &x, sizeof x);
  double r = 0.0;
  for (int k = 0; k < W; ++k) r += b[k];
  return r;
}

SMES_CPU_INLINE void atomic_add(double* p, double x) {
  uint64_t* q = reinterpret_cast<uint64_t*>(p);
  uint64_t old = __atomic_load_n(q, __ATOMIC_RELAXED);
  for (;;) {
    double cur;
    __builtin_memcpy(&cur, &old, sizeof cur);
    const double next = cur + x;
    uint64_t bits;
    __builtin_memcpy(&bits, &next, sizeof bits);
    if (__atomic_compare_exchange_n(q, &old, bits, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return;
  }
}

template <class P, class S, int PC, bool TV, bool AMS, bool L2>
void proj_stats_segment(const TensorJob& j, int64_t lo, int64_t hi) {
  if constexpr (PC != P_ZERO && !TV) {
    return;  // rejected by the binding: p != 0 needs v
  } else {
    const Scalars s = j.s;
    const int64_t len = j.row_len;
    for (int64_t a = lo; a < hi;) {
      const int64_t r = a / len;
      const int64_t b = hi < (r + 1) * len ? hi : (r + 1) * len;
      const P* pp = static_cast<const P*>(j.p) + a;
      const P* gp = static_cast<const P*>(j.g) + a;
      S* mp = static_cast<S*>(j.m) + a;
      S* vp = TV ? static_cast<S*>(j.v) + a : nullptr;
      S* xp = AMS ? static_cast<S*>(j.vmax) + a : nullptr;
      V gt = {}, gg = {}, tt = {}, tu = {};
      const int64_t n = b - a;
      auto one = [&](V th, V g, V& m, V& v, V& x) {
        g = g * s.gmul;
        gt += g * th;
        gg += g * g;
        tt += th * th;
        V vv = smes_moments<TV, AMS, L2, VecMath>(th, g, m, v, x, s);
        tu += th * smes_direction<PC, VecMath>(m, vv, s);
      };
      int64_t i = 0;
      V v = {}, x = {};
      for (; i + W <= n; i += W) {
        V th = load(pp + i), g = load(gp + i), m = load(mp + i);
        if (TV) v = load(vp + i);
        if (AMS) x = load(xp + i);
        one(th, g, m, v, x);
        store(mp + i, m);
        if (TV) store(vp + i, v);
        if (AMS) store(xp + i, x);
      }
      if (i < n) {
        const int k = (int)(n - i);
        V th = load_n(pp + i, k), g = load_n(gp + i, k), m = load_n(mp + i, k);
        if (TV) v = load_n(vp + i, k);
        if (AMS) x = load_n(xp + i, k);
        one(th, g, m, v, x);
        store_n(mp + i, m, k);
        if (TV) store_n(vp + i, v, k);
        if (AMS) store_n(xp + i, x, k);
      }
      double* st = j.stats + 4 * r;
      atomic_add(st + 0, hsum(gt));
      atomic_add(st + 1, hsum(gg));
      atomic_add(st + 2, hsum(tt));
      atomic_add(st + 3, hsum(tu));
      a = b;
    }
  }
}

template <class P, class S, int PC, bool TV, bool AMS, bool L2>
void proj_apply_segment(const TensorJob& j, int64_t lo, int64_t hi) {
  if constexpr (PC != P_ZERO && !TV) {
    return;
  } else {
    const Scalars s = j.s;
    const int64_t len = j.row_len;
    for (int64_t a = lo; a < hi;) {
      const int64_t r = a / len;
      const int64_t b = hi < (r + 1) * len ? hi : (r + 1) * len;
      P* pp = static_cast<P*>(j.p) + a;
      const S* mp = static_cast<const S*>(j.m) + a;
      const S* vp = TV ? static_cast<const S*>(AMS ? j.vmax : j.v) + a : nullptr;
      const float k = j.k[r];
      const int64_t n = b - a;
      auto one = [&](V th, V m, V vv) {
        V u = smes_direction<PC, VecMath>(m, vv, s) - k * th;
        return th * s.decay - s.step_size * u;
      };
      int64_t i = 0;
      for (; i + W <= n; i += W) {
        V m = load(mp + i);
        store_theta(pp + i, one(load(pp + i), m, TV ? load(vp + i) : m), j, a + i);
      }
      if (i < n) {
        const int c = (int)(n - i);
        V m = load_n(mp + i, c);
        store_theta_n(pp + i, one(load_n(pp + i, c), m, TV ? load_n(vp + i, c) : m), c, j, a + i);
      }
      a = b;
    }
  }
}

// Variant dispatch, once per (tensor, thread) segment, for each kind of segment.
struct StepSeg {
  static constexpr bool kL2Variants = true;
  template <class P, class S, int PC, bool TV, bool AMS, bool L2>
  static void run(const TensorJob& j, int64_t lo, int64_t hi) {
    segment<P, S, PC, TV, AMS, L2>(j, lo, hi);
  }
};
struct StatsSeg {
  static constexpr bool kL2Variants = true;
  template <class P, class S, int PC, bool TV, bool AMS, bool L2>
  static void run(const TensorJob& j, int64_t lo, int64_t hi) {
    proj_stats_segment<P, S, PC, TV, AMS, L2>(j, lo, hi);
  }
};
struct ApplySeg {  // L2 is in the stored moments already
  static constexpr bool kL2Variants = false;
  template <class P, class S, int PC, bool TV, bool AMS, bool L2>
  static void run(const TensorJob& j, int64_t lo, int64_t hi) {
    proj_apply_segment<P, S, PC, TV, AMS, false>(j, lo, hi);
  }
};

template <class Seg, class P, class S, int PC, bool TV, bool AMS>
void by_l2(const TensorJob& j, int64_t lo, int64_t hi) {
  if (Seg::kL2Variants && (j.code & kL2))
    Seg::template run<P, S, PC, TV, AMS, true>(j, lo, hi);
  else
    Seg::template run<P, S, PC, TV, AMS, false>(j, lo, hi);
}
template <class Seg, class P, class S, int PC>
void by_state(const TensorJob& j, int64_t lo, int64_t hi) {
  if (!(j.code & kTrackV))
    by_l2<Seg, P, S, PC, false, false>(j, lo, hi);
  else if (j.code & kAmsgrad)
    by_l2<Seg, P, S, PC, true, true>(j, lo, hi);
  else
    by_l2<Seg, P, S, PC, true, false>(j, lo, hi);
}
template <class Seg, class P, class S>
void by_pclass(const TensorJob& j, int64_t lo, int64_t hi) {
  switch (j.code & kPClassMask) {
    case P_ZERO: by_state<Seg, P, S, P_ZERO>(j, lo, hi); break;
    case P_HALF: by_state<Seg, P, S, P_HALF>(j, lo, hi); break;
    default: by_state<Seg, P, S, P_GENERAL>(j, lo, hi); break;
  }
}
template <class Seg>
void dispatch_seg(const TensorJob& j, int64_t lo, int64_t hi) {
  switch (j.pdt * 3 + j.sdt) {
    case F32 * 3 + F32: by_pclass<Seg, float, float>(j, lo, hi); break;
    case BF16 * 3 + F32: by_pclass<Seg, bf16, float>(j, lo, hi); break;
    case F16 * 3 + F32: by_pclass<Seg, f16, float>(j, lo, hi); break;
    case BF16 * 3 + BF16: by_pclass<Seg, bf16, bf16>(j, lo, hi); break;
    case F16 * 3 + F16: by_pclass<Seg, f16, f16>(j, lo, hi); break;
    default: break;  // rejected by the binding
  }
}
void dispatch(const TensorJob& j, int64_t lo, int64_t hi) { dispatch_seg<StepSeg>(j, lo, hi); }
void dispatch_stats(const TensorJob& j, int64_t lo, int64_t hi) {
  dispatch_seg<StatsSeg>(j, lo, hi);
}
void dispatch_apply(const TensorJob& j, int64_t lo, int64_t hi) {
  dispatch_seg<ApplySeg>(j, lo, hi);
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
    store(vp + i, load(vp + i) + g * g);  // v stays >= 0: a valid state for the optimizers
  }
  for (; i < n; ++i) {
    pp[i] -= a * gp[i];
    mp[i] += gp[i];
    vp[i] += gp[i] * gp[i];
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
