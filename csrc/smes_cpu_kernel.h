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

// A block of K vectors (segment passes blocks to the rule on AVX2 at general p): the rule's
// arithmetic is done on each vector in turn, spelt out without loops or casts so that GCC keeps
// the block in registers (a GCC vector of K V, the earlier form, went through the stack).
template <int... I>
struct Seq {};
template <int N, int... I>
struct MakeSeq : MakeSeq<N - 1, N - 1, I...> {};
template <int... I>
struct MakeSeq<0, I...> {
  using type = Seq<I...>;
};
template <int K>
struct Block {
  V x[K];
};
template <int K, class Fn, int... I>
SMES_CPU_INLINE Block<K> bmap(Seq<I...>, Fn fn, const Block<K>& a) {
  return {{fn(a.x[I])...}};
}
template <int K, class Fn, int... I>
SMES_CPU_INLINE Block<K> bmap(Seq<I...>, Fn fn, const Block<K>& a, const Block<K>& b) {
  return {{fn(a.x[I], b.x[I])...}};
}
#define SMES_BLOCK_OP(op)                                                                    \
  template <int K>                                                                           \
  SMES_CPU_INLINE Block<K> operator op(const Block<K>& a, const Block<K>& b) {               \
    return bmap(typename MakeSeq<K>::type{},                                                 \
                [](V x, V y) __attribute__((always_inline)) { return x op y; }, a, b);       \
  }                                                                                          \
  template <int K>                                                                           \
  SMES_CPU_INLINE Block<K> operator op(const Block<K>& a, float b) {                         \
    return bmap(typename MakeSeq<K>::type{},                                                 \
                [b](V x) __attribute__((always_inline)) { return x op b; }, a);              \
  }                                                                                          \
  template <int K>                                                                           \
  SMES_CPU_INLINE Block<K> operator op(float a, const Block<K>& b) {                         \
    return bmap(typename MakeSeq<K>::type{},                                                 \
                [a](V y) __attribute__((always_inline)) { return a op y; }, b);              \
  }
SMES_BLOCK_OP(+)
SMES_BLOCK_OP(-)
SMES_BLOCK_OP(*)
SMES_BLOCK_OP(/)
#undef SMES_BLOCK_OP

struct VecMath {
  // The element-wise functions take V or a Block: `each` applies an operation on V to every
  // vector of a block.
  template <class Fn>
  SMES_CPU_INLINE V each(Fn fn, V a) { return fn(a); }
  template <class Fn>
  SMES_CPU_INLINE V each(Fn fn, V a, V b) { return fn(a, b); }
  template <int K, class Fn>
  SMES_CPU_INLINE Block<K> each(Fn fn, const Block<K>& a) {
    return bmap(typename MakeSeq<K>::type{}, fn, a);
  }
  template <int K, class Fn>
  SMES_CPU_INLINE Block<K> each(Fn fn, const Block<K>& a, const Block<K>& b) {
    return bmap(typename MakeSeq<K>::type{}, fn, a, b);
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
  // AVX2 + FMA. AVX2 has no getexp, getmant, scalef or fixupimm; pow_hat takes one of two paths
  // for each v:
  // - pow_fast, for v a normal float in a per-tensor range of bits where (v / bc2)^p is a normal
  //   float too (one integer compare per vector, one branch per block for the others):
  //   no special values, no clamps, 2^n added to the exponent field of a table entry, and the
  //   exponent rounded early (from the exponent field alone), so that the rounding does not wait
  //   for the log2 polynomial. 20 vector instructions per vector (22 for |p| > 1/2), 2 of them
  //   vpermps, and 3 for the range.
  // - pow_general, for any v (0, denormal, inf, NaN) and any finite p: denormals normalised, the
  //   exponent rounded by vroundps after the log2, 2^n as two factors (so that a denormal or
  //   overflowing result rounds once, as scalef does), and v = 0, inf and NaN blended in.
  // The chains' latency counts as much as their instructions (the out-of-order core overlaps
  // the chains of different vectors only as far as its window reaches), so the fast path takes
  // the shortest exp2 polynomial the error budget allows: degree 3 for |p| <= 1/2, 4 above
  // (measured: 4-10% of the general-p step; the log2's degree changes at |p| = 1/2 as well, see
  // below), and runs two vectors in lockstep (each operation
  // on both in turn, so that two independent chains sit next to each other in the instruction
  // stream; GCC keeps the source order): `python -m bench.compute_floor --exponents 0.5 0 0.37
  // -0.08 --repeats 15` from two builds alternately, 16 rounds (Zen 3 EPYC, `avx2`), median
  // ratio of general p to p = 0.5 2.00 -> 1.92 (p = 0.37) and 2.01 -> 1.94 (p = -0.08) against
  // one vector after another; four in lockstep, or three, were slower than two in a scratch
  // harness (spills), so 16-bit params' blocks of four run as two lockstep pairs.
  //
  // The log2 takes no table of logarithms: kRcp8[k] = 2^-(k/8 + kMid), so that for mant in
  // [1 + k/8, 1 + (k+1)/8) log2(mant) = k/8 + kMid + log2(1 + f), f = mant kRcp8[k] - 1 in
  // [-0.0702, 0.0755], log2(1 + f) in [-0.105, 0.105]; k/8 and kMid go into the exponent's
  // linear part (p/8 y, y = 8 E + k, and a constant), so one vpermps per vector is saved (the
  // float32 rounding of kRcp8 changes log2 by at most 6.8e-8).
  // Tables, for k = 0..7 (python: kRcp8[k] = float32(2 ** -(k / 8 + 0.105));
  // kExp8[k] = float32(2 ** (k / 8))):
  static constexpr float kMid = 0.105f;
  alignas(32) static constexpr float kRcp8[8] = {
      0.92980492115f, 0.85263490677f, 0.78186964989f, 0.71697759628f,
      0.65747135878f, 0.60290390253f, 0.5528653264f, 0.50697976351f};
  alignas(32) static constexpr float kExp8[8] = {
      1.0f, 1.0905077457f, 1.189207077f, 1.2968395948f,
      1.4142135382f, 1.5422108173f, 1.6817928553f, 1.8340080976f};
  // Minimax fits (scipy.optimize.linprog on 20001 points; errors of the float32 coefficients):
  // log2(1 + f) = f (l1 + l2 f + l3 f^2) for f in [-0.0702, 0.0755]: absolute error 1.7e-6
  // (relative error of the power 1.2e-6 |p|: the fast path for |p| <= 1/2);
  // log2(1 + f) = f (h1 + h2 f + h3 f^2 + h4 f^3) there: absolute error 3.9e-8 (|p| > 1/2, and
  // the general path; fitted with f scaled by 1/0.0755: unscaled, the solver stopped at 5.8e-8);
  // 2^f = 1 + f (e1 + e2 f + e3 f^2) for |f| <= 0.1155: relative error 3.3e-7;
  // 2^f = 1 + f (d1 + d2 f + d3 f^2 + d4 f^3) for |f| <= 0.1955: relative error 7.8e-8.
  static constexpr float kL1 = 1.44270003f, kL2 = -0.722923338f, kL3 = 0.479261816f;
  static constexpr float kH1 = 1.44269264f, kH2 = -0.721355021f, kH3 = 0.482777596f,
                         kH4 = -0.359307736f;
  static constexpr float kE1 = 0.693146944f, kE2 = 0.240334183f, kE3 = 0.0555249304f;
  static constexpr float kD1 = 0.693147182f, kD2 = 0.240226507f, kD3 = 0.0555551462f,
                         kD4 = 0.00962405f;

  SMES_CPU_INLINE __m256 fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
  SMES_CPU_INLINE __m256 fma(__m256 a, __m256 b, float c) { return fma(a, b, _mm256_set1_ps(c)); }
  SMES_CPU_INLINE __m256 fma(float a, __m256 b, __m256 c) { return fma(_mm256_set1_ps(a), b, c); }
  SMES_CPU_INLINE __m256 lookup(__m256 tab, __m256 k) {  // tab[bits 2..0 of k]
    return _mm256_permutevar8x32_ps(tab, _mm256_castps_si256(k));
  }
  SMES_CPU_INLINE __m256i bits(__m256 x) { return _mm256_castps_si256(x); }
  SMES_CPU_INLINE __m256 flt(__m256i x) { return _mm256_castsi256_ps(x); }
  template <class T>
  SMES_CPU_INLINE T quot(T m, T d) { return m / d; }

  // te 2^f = te + (te f) q(f), q of degree 2 (D4 = false) or 3. Here and in log2_parts and
  // pow_fast, K vectors in lockstep (each operation on all K in turn; see above).
  template <bool D4, int K>
  SMES_CPU_INLINE void exp2_poly(const __m256* te, const __m256* f, __m256* r) {
    __m256 q[K];
    if (D4) {
      for (int k = 0; k < K; ++k) q[k] = fma(f[k], _mm256_set1_ps(kD4), kD3);
      for (int k = 0; k < K; ++k) q[k] = fma(f[k], q[k], kD2);
      for (int k = 0; k < K; ++k) q[k] = fma(f[k], q[k], kD1);
    } else {
      for (int k = 0; k < K; ++k) q[k] = fma(f[k], _mm256_set1_ps(kE3), kE2);
      for (int k = 0; k < K; ++k) q[k] = fma(f[k], q[k], kE1);
    }
    for (int k = 0; k < K; ++k) r[k] = fma(_mm256_mul_ps(te[k], f[k]), q[k], te[k]);
  }

  // The power function's per-tensor constants (computed once per segment: KScalars below).
  // R = p log2 v + shift (shift = -p log2 bc2) = p/8 y + t + hi + lo, with y = 8 E + k (E the
  // exponent field, k the top 3 mantissa bits) and t = p log2(1 + f) (log2_parts):
  // c = shift - 127 p + kMid p (127 p: the exponent bias, so that y needs no offset) = hi + lo,
  // hi a multiple of 1/8 and |lo| <= 1/16 (where |c| >= 2^19, for |p| in the thousands, hi = 0
  // and lo = c; only the general path runs there). The fast path puts lo into its exp2 table
  // (2^(k/8 + lo)), so that the exp2 polynomial's argument stays small.
  // Fast path: rm = p/8 y + magic, magic = 1.5 2^20 + hi, has an ulp of 1/8 and the bits of
  // 1.5 2^20 plus 8 (n + k/8) for n + k/8 = p/8 y + hi rounded to a multiple of 1/8; the rest of
  // the exponent, fr = (p/8 y + hi - (n + k/8)) + t, is at most 1/16 + 0.105 |p|. In the range
  // (bits in [lo_bits, hi_bits]) v is normal and R in [-124, 126] for every v of v's binade, so
  // that n added to an exponent field does not overflow and the result is a normal float.
  struct PowConsts {
    float p8, hi, lo, magic;          // p/8, hi, lo, 1.5 2^20 + hi
    float l[3], h[4];                 // p kL1..p kL3 (log2 of degree 3), p kH1..p kH4 (4)
    __m256 exp_tab;                   // the bits of 2^(k/8 + lo) less k << 20
    uint32_t off, lim;                // in range: (int32)(bits + off) <= (int32)lim
    int32_t neg;                      // -1 for p < 0
    bool ok, d4;                      // the fast path may be taken; log2 and exp2 of degree 4
  };
  static PowConsts pow_consts(const Scalars& s) {
    PowConsts c;
    const double p = s.p, shift = s.log2_shift;
    const double cc = shift - 127.0 * p + (double)kMid * p;
    const double hi = __builtin_fabs(cc) < 0x1p19 ? __builtin_rint(cc * 8.0) * 0.125 : 0.0;
    const double lo = cc - hi;
    c.p8 = s.p * 0.125f;
    c.hi = (float)hi;  // exact: a multiple of 1/8 below 2^19
    c.lo = (float)lo;
    c.magic = 1572864.0f + c.hi;
    c.d4 = __builtin_fabs(p) > 0.5;
    const float kl[3] = {kL1, kL2, kL3}, kh[4] = {kH1, kH2, kH3, kH4};
    for (int j = 0; j < 3; ++j) c.l[j] = s.p * kl[j];
    for (int j = 0; j < 4; ++j) c.h[j] = s.p * kh[j];
    // 2^(k/8 + lo) = 2^(k/8) e^(lo ln 2), the exponential's Taylor series to degree 8 (for
    // |lo| <= 1/16 its remainder is below 1e-18; no libm call per segment)
    static constexpr double kExp8d[8] = {1.0, 1.0905077326652577, 1.189207115002721,
                                         1.2968395546510096, 1.4142135623730951,
                                         1.5422108254079407, 1.681792830507429,
                                         1.8340080864093424};
    const double x = __builtin_fabs(lo) <= 0.0625 ? lo * 0.6931471805599453 : 0.0;
    double e2 = 1.0;
    for (int j = 8; j >= 1; --j) e2 = 1.0 + e2 * x / j;
    alignas(32) float e[8];
    for (int k = 0; k < 8; ++k) e[k] = (float)(kExp8d[k] * e2);
    c.exp_tab = flt(_mm256_sub_epi32(
        bits(_mm256_load_ps(e)),
        _mm256_setr_epi32(0, 1 << 20, 2 << 20, 3 << 20, 4 << 20, 5 << 20, 6 << 20, 7 << 20)));
    c.neg = s.p < 0.0f ? -1 : 0;
    // exponent fields E = e_lo..e_hi (log2 v in [E - 127, E - 126)) with R in [-124, 126]
    const double a = (-124.0 - shift) / p, b = (126.0 - shift) / p;
    double e_lo = __builtin_ceil(a < b ? a : b) + 127.0;
    double e_hi = __builtin_floor(a < b ? b : a) + 126.0;
    e_lo = e_lo >= 1.0 ? e_lo : 1.0;  // and for NaN
    e_hi = e_hi <= 254.0 ? e_hi : 254.0;
    c.ok = __builtin_fabs(p) <= 1.25 && __builtin_fabs(p) >= 0x1p-100 &&
           __builtin_fabs(cc) < 0x1p18 && e_lo <= e_hi;
    const uint32_t lo_bits = c.ok ? (uint32_t)e_lo << 23 : 0u;
    const uint32_t hi_bits = c.ok ? ((uint32_t)e_hi + 1u) << 23 : 0u;
    c.off = 0x80000000u - lo_bits;
    c.lim = 0x80000000u + (hi_bits - 1u - lo_bits);
    return c;
  }
  // log2 in two parts, for the bits b of v > 0 (or of a normalised denormal, whose exponent field
  // reads -22..0): y = b >> 20 = 8 E + k (an exact integer) and t = p log2(1 + f) =
  // p (log2(mant) - k / 8 - kMid), f = mant kRcp8[k] - 1 (one rounding), with p folded into the
  // coefficients l: PowConsts::l (degree 3), or PowConsts::h where D4 (degree 4).
  template <bool D4, int K>
  SMES_CPU_INLINE void log2_parts(const __m256i* b, const float* l, __m256* y, __m256* t) {
    __m256 sh[K], f[K], q[K];
    for (int k = 0; k < K; ++k) sh[k] = flt(_mm256_srai_epi32(b[k], 20));
    for (int k = 0; k < K; ++k) y[k] = _mm256_cvtepi32_ps(bits(sh[k]));
    const __m256 one = _mm256_set1_ps(1.0f);  // also the exponent field of mant
    for (int k = 0; k < K; ++k) {
      const __m256 mant = _mm256_or_ps(_mm256_and_ps(flt(b[k]), flt(_mm256_set1_epi32(0x007fffff))),
                                       one);
      f[k] = _mm256_fmsub_ps(mant, lookup(_mm256_load_ps(kRcp8), sh[k]), one);
    }
    if (D4) {
      for (int k = 0; k < K; ++k) q[k] = fma(f[k], _mm256_set1_ps(l[3]), l[2]);
      for (int k = 0; k < K; ++k) q[k] = fma(f[k], q[k], l[1]);
    } else {
      for (int k = 0; k < K; ++k) q[k] = fma(f[k], _mm256_set1_ps(l[2]), l[1]);
    }
    for (int k = 0; k < K; ++k) q[k] = fma(f[k], q[k], l[0]);
    for (int k = 0; k < K; ++k) t[k] = _mm256_mul_ps(f[k], q[k]);
  }
  // all ones where v is out of the fast path's range
  SMES_CPU_INLINE __m256i out_of_range(__m256 v, const PowConsts& c) {
    return _mm256_cmpgt_epi32(_mm256_add_epi32(bits(v), _mm256_set1_epi32((int32_t)c.off)),
                              _mm256_set1_epi32((int32_t)c.lim));
  }
  // pow_fast in two stages, log2 (pow_log: y and t) and exp2 (pow_exp), which the general-p
  // pipeline (segment) runs for different blocks.
  template <bool D4, int K>
  SMES_CPU_INLINE void pow_log(const __m256* v, const PowConsts& c, __m256* y, __m256* t) {
    __m256i b[K];
    for (int k = 0; k < K; ++k) b[k] = bits(v[k]);
    log2_parts<D4, K>(b, D4 ? c.h : c.l, y, t);
  }
  template <bool D4, int K>
  SMES_CPU_INLINE void pow_exp(const __m256* y, const __m256* t, const PowConsts& c, __m256* r) {
    __m256 rm[K], fr[K], te[K];
    // rm from y alone; p/8 y - (rm - magic) from one FMA (exact: its result is at most 1/16)
    const __m256 magic = _mm256_set1_ps(c.magic);
    for (int k = 0; k < K; ++k) rm[k] = fma(c.p8, y[k], magic);
    for (int k = 0; k < K; ++k)
      fr[k] = _mm256_add_ps(fma(c.p8, y[k], _mm256_sub_ps(magic, rm[k])), t[k]);
    // 2^(n + k/8 + lo): rm's bits << 20 are n << 23 plus k << 20 (1.5 2^20's own bits shift
    // out), which exp_tab has taken off
    for (int k = 0; k < K; ++k)
      te[k] = flt(_mm256_add_epi32(bits(lookup(c.exp_tab, rm[k])),
                                   _mm256_slli_epi32(bits(rm[k]), 20)));
    exp2_poly<D4, K>(te, fr, r);
  }
  template <bool D4, int K>
  SMES_CPU_INLINE void pow_fast(const __m256* v, const PowConsts& c, __m256* r) {
    __m256 y[K], t[K];
    pow_log<D4, K>(v, c, y, t);
    pow_exp<D4, K>(y, t, c, r);
  }
  // Any v, any finite p: R rounded to a multiple of 1/8 (n + k/8) by vroundps and clamped to
  // [-160, 130], where 2^R rounds to 0 or overflows; the fraction fr = p/8 y + (hi - n - k/8) +
  // (t + lo), at most 1/16, with p/8 y + (hi - n - k/8) from one FMA as on the fast path.
  SMES_CPU_INLINE __m256 pow_general(__m256 v, const PowConsts& c) {
    // Denormals (bits below 2^23, and 0): the bits b convert exactly to b = v 2^149; less 149 in
    // the exponent field they are those of 2^23 v with 23 taken off the exponent field, which
    // then reads -22..0 while the mantissa field is that of a normal number.
    const __m256i b = bits(v);
    const __m256i scaled = _mm256_sub_epi32(bits(_mm256_cvtepi32_ps(b)),
                                            _mm256_set1_epi32(149 << 23));
    const __m256i tiny = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x00800000), b);
    const __m256i bn = bits(_mm256_blendv_ps(v, flt(scaled), flt(tiny)));
    __m256 y, t;
    log2_parts<true, 1>(&bn, c.h, &y, &t);
    const __m256 hi = _mm256_set1_ps(c.hi);
    t = _mm256_add_ps(t, _mm256_set1_ps(c.lo));
    __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_add_ps(fma(c.p8, y, t), hi),
                                             _mm256_set1_ps(8.0f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // 8 (n + k/8)
    r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-1280.0f)), _mm256_set1_ps(1040.0f));
    // the fraction, clamped where R was (there the result is 0 or inf whatever it is)
    __m256 fr = _mm256_add_ps(
        fma(c.p8, y, _mm256_fnmadd_ps(r, _mm256_set1_ps(0.125f), hi)), t);  // hi - r/8: exact
    fr = _mm256_min_ps(_mm256_max_ps(fr, _mm256_set1_ps(-0.125f)), _mm256_set1_ps(0.125f));
    const __m256i n8 = _mm256_cvtps_epi32(r);
    const __m256i n = _mm256_srai_epi32(n8, 3);  // [-160, 130]: n1, n2 >= -80
    const __m256i n1 = _mm256_srai_epi32(n, 1), n2 = _mm256_sub_epi32(n, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 te = lookup(_mm256_load_ps(kExp8), flt(n8));
    exp2_poly<true, 1>(&te, &fr, &r);
    r = _mm256_mul_ps(r, flt(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23)));
    r = _mm256_mul_ps(r, flt(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23)));
    // v = 0, inf, NaN (and any negative v, which v never is): v itself for p > 0; for p < 0 the
    // bits 0x7f800000 - v (0 <-> inf, a NaN stays a NaN), as ~v + 0x7f800001. v is one of those
    // where bits + 0x7fffffff (wrapping) is not below 0xff7fffff as a signed integer, i.e. where
    // bits is not in [1, 0x7f7fffff].
    const __m256i neg = _mm256_set1_epi32(c.neg);
    const __m256i special = _mm256_add_epi32(
        _mm256_xor_si256(b, neg), _mm256_and_si256(neg, _mm256_set1_epi32(0x7f800001)));
    const __m256i w = _mm256_add_epi32(b, _mm256_set1_epi32(0x7fffffff));
    const __m256i ordinary = _mm256_cmpgt_epi32(_mm256_set1_epi32(-8388609), w);
    return _mm256_blendv_ps(flt(special), r, flt(ordinary));
  }
  // whether some v of the block is out of the fast path's range; needs_fixup: or the fast path
  // is off
  template <int K>
  SMES_CPU_INLINE bool any_out_of_range(const Block<K>& v, const PowConsts& c) {
    __m256i any = out_of_range((__m256)v.x[0], c);
    for (int i = 1; i < K; ++i) any = _mm256_or_si256(any, out_of_range((__m256)v.x[i], c));
    return !_mm256_testz_si256(any, any);
  }
  template <int K>
  SMES_CPU_INLINE bool needs_fixup(const Block<K>& v, const PowConsts& c) {
    return !c.ok || any_out_of_range(v, c);
  }
  // pow_hat's rare path: lanes out of the fast path's range take the general path's result. The
  // masks are computed again here (the empty asm hides v from GCC's value numbering): kept from
  // the test, they cost the common path 4 registers and 10% of the general-p step.
  template <int K>
  SMES_CPU_INLINE void pow_fixup(const Block<K>& v, Block<K>& r, const PowConsts& c) {
    for (int i = 0; i < K; ++i) {
      __m256 vi = (__m256)v.x[i];
      __asm__("" : "+x"(vi));
      const __m256 m = c.ok ? flt(out_of_range(vi, c)) : flt(_mm256_set1_epi32(-1));
      r.x[i] = (V)_mm256_blendv_ps((__m256)r.x[i], pow_general((__m256)v.x[i], c), m);
    }
  }
  // (v / bc2)^p = 2^R, R = p log2 v + shift, for a block of K vectors; s: KScalars. The fast path
  // runs first, unconditionally, so that no branch on v precedes the power's chains; where a
  // vector has v out of range (rare: v = 0, denormal v, extreme v / bc2), those lanes take the
  // general path's result. Each element's result depends on its own v alone, never on the
  // block it shares (bit-identical steps however a tensor is split: FSDP shards, segments).
  template <int K, class S>
  SMES_CPU_INLINE Block<K> pow_hat(const Block<K>& v, const S& s) {
    const PowConsts& c = s.pow;
    __m256 vk[K], rk[K];
    for (int i = 0; i < K; ++i) vk[i] = (__m256)v.x[i];
    constexpr int L = K % 2 == 0 ? 2 : 1;  // lockstep pairs (four at once spill)
    for (int i = 0; i < K; i += L) {
      if (c.d4) {
        pow_fast<true, L>(vk + i, c, rk + i);
      } else {
        pow_fast<false, L>(vk + i, c, rk + i);
      }
    }
    Block<K> r;
    for (int i = 0; i < K; ++i) r.x[i] = (V)rk[i];
    if (__builtin_expect(needs_fixup(v, c), 0)) pow_fixup(v, r, c);
    return r;
  }
  template <class S>
  SMES_CPU_INLINE V pow_hat(V v, const S& s) {
    return pow_hat(Block<1>{{v}}, s).x[0];
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

// The step's scalars, with the power function's per-tensor constants where it has any (AVX2).
struct KScalars : Scalars {
#if SMES_W == 8
  VecMath::PowConsts pow;
#endif
  explicit KScalars(const Scalars& s, bool general_p) : Scalars(s) {
#if SMES_W == 8
    if (general_p) pow = VecMath::pow_consts(s);
#else
    (void)general_p;
#endif
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

// 16-bit storage. On AVX2 GCC splits __builtin_convertvector between 8 x 16 and 8 x 32 bits into
// 128-bit halves (five instructions per bf16 load instead of two, a scalar conversion per element
// for float16), so the conversions are spelt with intrinsics there; the bits are the same.
#if SMES_W == 8
SMES_CPU_INLINE V load(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (V)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
}
// the low 16 bits of each lane (the lanes are below 2^16)
SMES_CPU_INLINE void store_u16(bf16* p, VU x) {
  const __m256i r = (__m256i)x;
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}
SMES_CPU_INLINE V load(const f16* p) {
  return (V)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
SMES_CPU_INLINE void store(f16* p, V x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
SMES_CPU_INLINE V load(const bf16* p) {
  VH h;
  __builtin_memcpy(&h, p, sizeof h);
  return (V)(__builtin_convertvector(h, VU) << 16);
}
SMES_CPU_INLINE void store_u16(bf16* p, VU x) {
  VH h = __builtin_convertvector(x, VH);
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
#endif
// round to nearest even; NaN stays a quiet NaN (as c10::BFloat16 does)
SMES_CPU_INLINE VU bf16_rne(V x) {
  VU u = (VU)x;
  u = u + 0x7fffu + ((u >> 16) & 1u);
  return (x != x) ? (VU{} + 0x7fc00000u) : u;
}
SMES_CPU_INLINE void store(bf16* p, V x) { store_u16(p, bf16_rne(x) >> 16); }
#if SMES_W == 8
// bf16 params and state together, AVX2: 16 elements as two vectors, the
// even-indexed ones and the odd-indexed ones, one instruction each to load and to merge for the
// store instead of a lane-crossing widening and a pack. The rule is element-wise, so the order of
// the lanes does not change any result.
SMES_CPU_INLINE void load_pair(const bf16* p, V& even, V& odd) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = (V)_mm256_slli_epi32(x, 16);
  odd = (V)_mm256_and_si256(x, _mm256_set1_epi32((int)0xFFFF0000u));
}
// the bf16 bits (low half of each lane) of the even and the odd elements
SMES_CPU_INLINE void store_pair_bits(bf16* p, VU even, VU odd) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)(even | (odd << 16)));
}
SMES_CPU_INLINE void store_pair(bf16* p, V even, V odd) {
  store_pair_bits(p, bf16_rne(even) >> 16, bf16_rne(odd) >> 16);
}
#endif
template <bool B>
struct BoolC {
  static constexpr bool value = B;
};

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

SMES_CPU_INLINE VU iota() {  // 0, 1, ..., W - 1 (a constant once inlined)
  VU r = {};
  for (int k = 0; k < W; ++k) r[k] = (uint32_t)k;
  return r;
}

// Stochastic rounding (j.sr; smes_math.h, sr_noise) of bf16 params: the float32 bits plus 16
// random bits, truncated; NaN stored as store() stores it. The noise of a vector takes one vector
// hash (mix32 of key ^ mix32(hi) ^ lo): its elements share hi, whose mix32 is scalar code, except
// in the rare vectors that straddle a multiple of 2^32 (`python -m bench --dtype bfloat16
// [--state-dtype float32] --stochastic-rounding ...`, interleaved from two builds, mean of 18
// cells: float32 state 0.56x -> 0.79x fused AdamW against a per-lane hash of lo and hi built
// element by element; then the straddle test as a branch instead of a compare and blend per
// vector, 0.77x -> 0.80x, and bf16 state 0.88x -> 0.97x).
// sr_noise of the elements index + off[k]
SMES_CPU_INLINE VU sr_noise_at(const TensorJob& j, int64_t index, VU off) {
  const uint32_t lo0 = (uint32_t)index, hi0 = (uint32_t)((uint64_t)index >> 32);
  const VU lo = (VU{} + lo0) + off;  // off[k] < 2 W
  VU kh = VU{} + (j.sr_key ^ mix32(hi0));
  if (__builtin_expect(lo0 > 0xFFFFFFFFu - (2 * W - 1), 0)) {
    // lo wraps past 2^32 in the lanes whose hi is one more (sr_noise_lanes tests them)
    kh = (lo < lo0) ? VU{} + (j.sr_key ^ mix32(hi0 + 1u)) : kh;
  }
  return sr_noise_lo(kh, lo);
}
// x rounded with the noise r: bf16 bits in the low half of each lane (+-inf stay: their low bits
// are 0)
SMES_CPU_INLINE VU sr_round(V x, VU r) { return (x != x) ? VU{} + 0x7fc0u : ((VU)x + r) >> 16; }

// theta to storage, rounded stochastically where j.sr says so
template <class P>
SMES_CPU_INLINE void store_theta(P* p, V x, const TensorJob&, int64_t) {
  store(p, x);
}
SMES_CPU_INLINE void store_theta(bf16* p, V x, const TensorJob& j, int64_t index) {
  if (j.sr) {
    store_u16(p, sr_round(x, sr_noise_at(j, index, iota())));
  } else {
    store(p, x);
  }
}
// sr_noise_at's noise for the lanes of a vector (index + k), then of a pair (index + 2k, index +
// 2k + 1): 3 W values, for tests/test_rounding.py (indices that straddle a multiple of 2^32)
int sr_noise_lanes(uint32_t key, int64_t index, uint32_t* out) {
  TensorJob j{};
  j.sr_key = key;
  const VU r[3] = {sr_noise_at(j, index, iota()), sr_noise_at(j, index, iota() * 2u),
                   sr_noise_at(j, index, iota() * 2u + 1u)};
  __builtin_memcpy(out, r, sizeof r);
  return 3 * W;
}
template <class P>
SMES_CPU_INLINE void store_theta_n(P* p, V x, int n, const TensorJob& j, int64_t index) {
  P buf[W];
  store_theta(buf, x, j, index);
  __builtin_memcpy(p, buf, n * sizeof(P));
}

// Blocks of vectors (segment: kBlockOf<P> at general p on AVX2, 2 in the two-vector loop).
// PAIRS: as even/odd pairs of vectors (bf16 on AVX2 only, see load_pair).
template <class VB, bool PAIRS, class T>
SMES_CPU_INLINE VB load_block(const T* p) {
  VB r;
  constexpr int K = (int)(sizeof(VB) / sizeof(V));
  if constexpr (PAIRS) {
    for (int k = 0; k < K; k += 2) load_pair(p + k * W, r.x[k], r.x[k + 1]);
  } else {
    for (int k = 0; k < K; ++k) r.x[k] = load(p + k * W);
  }
  return r;
}
template <class VB, bool PAIRS, class T>
SMES_CPU_INLINE void store_block(T* p, const VB& b) {
  constexpr int K = (int)(sizeof(VB) / sizeof(V));
  if constexpr (PAIRS) {
    for (int k = 0; k < K; k += 2) store_pair(p + k * W, b.x[k], b.x[k + 1]);
  } else {
    for (int k = 0; k < K; ++k) store(p + k * W, b.x[k]);
  }
}
// theta of a block to storage: store_theta for each vector, or as pairs (SR: a compile-time
// switch there, so that round to nearest keeps the pair loop it had; the noise of elements
// index + 2k in the even vector, index + 2k + 1 in the odd one). bf16 params and state with
// stochastic rounding took the contiguous loops before (`python -m bench --dtype bfloat16
// --stochastic-rounding ...`, interleaved from two builds, mean of 18 cells: 0.62x -> 0.88x fused
// AdamW; round to nearest 1.115x and 1.120x); a run-time SR test in the pair loop cost round to
// nearest 2-3% there.
template <class VB, bool PAIRS, bool SR, class P>
SMES_CPU_INLINE void store_theta_block(P* p, const VB& b, const TensorJob& j, int64_t index) {
  constexpr int K = (int)(sizeof(VB) / sizeof(V));
  if constexpr (PAIRS) {
#if SMES_W == 8
    if constexpr (SR) {
      for (int k = 0; k < K; k += 2) {
        const int64_t e = index + k * W;
        store_pair_bits(p + k * W, sr_round(b.x[k], sr_noise_at(j, e, iota() * 2u)),
                        sr_round(b.x[k + 1], sr_noise_at(j, e, iota() * 2u + 1u)));
      }
      return;
    }
#endif
    store_block<VB, true>(p, b);
  } else {
    for (int k = 0; k < K; ++k) store_theta(p + k * W, b.x[k], j, index + k * W);
  }
}

// Vectors per block at general p on AVX2: two for float32 params, four for 16-bit ones. Four run
// the step faster from L1 (the chains of more vectors overlap) but spill about a quarter of the
// loop's instructions to the stack for want of registers (objdump of the built loop). `python -m
// bench ... --backends cpu --repeats 7 --warmup 2` interleaved from two builds, 4 rounds each (Zen
// 3 EPYC, 2 vCPUs; mean of the general-p cells' ratio to fused AdamW): float32 (`--sets large gpt2
// llama --exponents -0.08 0.37`), 4 -> 2 vectors 1.015x -> 1.070x and, again, 1.007x -> 1.051x (1
// vector: 0.966x against 1.032x for 2); there the step is memory-bound (a variant without the power
// function's range test, less arithmetic per element, did not move it: 1.057x -> 1.054x). bf16
// params (`--dtype bfloat16 --sets large gpt2 llama --exponents -0.08`), which move half the bytes
// for the same arithmetic, are not: 2 -> 4 vectors 0.955x -> 1.010x with bf16 state, 0.924x ->
// 0.988x with float32 state.
template <class P>
constexpr int kBlockOf = sizeof(P) == 4 ? 2 : 4;

// Software prefetch (AVX2 at general p only): every cache line of each stream, kPrefetchBytes
// ahead. There the hardware prefetcher alone leaves the power function's arithmetic exposed on a
// large tensor (Zen 3 EPYC, `python -m bench` interleaved from two builds: general p 0.91x ->
// 1.01x fused AdamW on average; README, AVX2 section). The other loops have little arithmetic
// to hide: prefetching them was slower in an earlier session (Zen 4), and 512 B ahead gave mixed
// results (README, AVX2 section), so they go without. The distance: 512 B
// (8 lines per stream, 128 float32 elements), from `python -m bench --sets large gpt2 llama
// --exponents -0.08 0.37 --backends cpu` with builds alternated, 6 rounds (Zen 4 EPYC capped at
// `avx2`; mean of the six general-p cells' medians, x fused AdamW), in two batches: none 0.965,
// 256 B 1.070, 512 B 1.094, 1 KB 1.048, 2 KB (the distance before) 1.001; and 1 KB 1.018, 2 KB
// 1.007, 4 KB 0.954, 8 KB 0.917. bf16 params (`--dtype bfloat16`): 512 B 0.908, 2 KB 0.889.
constexpr int kPrefetchBytes = 512;
// the cache lines of p[d, d + n), d = kPrefetchBytes ahead
template <class T>
SMES_CPU_INLINE void prefetch_lines(const T* p, int n) {
  constexpr int d = kPrefetchBytes / (int)sizeof(T);
  for (int q = 0; q < n; q += 64 / (int)sizeof(T)) __builtin_prefetch(p + d + q);
}

#if SMES_W == 8
// AVX2, general p, float32 params and state: a software pipeline over blocks of two vectors, in
// three stages: the moments and log2 of block b + 2 (pow_log), the exp2 of block b + 1 (pow_exp),
// then the division and theta of block b. One block's chain, from its loads through the power and
// the division to its theta, is about 70 cycles long (instruction latencies summed); done in one
// iteration, the loop issued about half of what the FMA pipes can take (objdump: about 20 of their
// instructions per vector; bench.compute_floor below: about 21 cycles per vector at 2.45 GHz), so
// the chains, not the instructions, bounded it. Spread over three iterations, three blocks' chains
// overlap. Measured (Zen 3 EPYC, `avx2`): `python -m bench.compute_floor --exponents 0.5 0 0.37
// -0.08 --repeats 15`, builds before and after alternately, 8 rounds: general p 1.077 -> 0.889
// ns/element (p = 0.37) and 1.079 -> 0.861 (p = -0.08), p = 0.5 0.635 and 0.611; the benchmark
// (README, AVX2 section) 1.025x -> 1.053x fused AdamW, mean of 48 general-p cells. Two stages (the
// power of block b + 1, then the rest of block b) gained about half as much in a scratch harness;
// the division moved into the second stage, nothing. The arithmetic is that of smes_update (the
// same operations in the same order: bit-identical to the other loops). A block with v out of the
// fast path's range (flagged in the first stage) takes pow_fixup in the second, with its v-hat
// reloaded from the state just stored (exact: float32), in an iteration of its own: the loop of the
// other iterations has no fix-up code, which GCC otherwise allocates registers around (`python -m
// bench.compute_floor` on a Zen 4 EPYC capped at `avx2`, builds alternated, 5 rounds: general p
// 1.30x -> 1.26x p = 0.5; README, AVX2 section). Only a tensor the fast path covers (PowConsts::ok)
// enters the pipeline, so its loop does not test `ok` either. GM: g is multiplied by gmul
// (maximize, 1/grad_scale), left out where gmul is 1 and there is no L2 term (exact: g * gmul is
// then only ever a factor; with L2, g * gmul + lambda * theta is what GCC contracts in the other
// loops, rounding otherwise than g + lambda * theta, which
// test_step_does_not_depend_on_how_the_tensor_is_split caught), which took the compute floor from
// 1.26x to 1.19-1.20x p = 0.5 (`python -m bench.compute_floor`, the README's AVX2 command, builds
// alternated, 5 rounds). The last stage reloads m from the state just stored rather than carry it
// over two iterations (two blocks' m, four vector registers, fewer in a loop that spills: in a
// scratch harness 129 -> 118 instructions per block, 2% off the general-p step). `i`: the first
// element, advanced past the blocks done (at least three blocks' worth of elements remain on
// entry).
template <bool D4, bool AMS, bool L2, bool GM>
SMES_CPU_INLINE void general_p_pipeline(int64_t n, int64_t& i, float* pp, const float* gp,
                                        float* mp, float* vp, float* xp, const KScalars& s) {
  static_assert(GM || !L2, "with L2 the multiply by gmul stays (see above)");
  constexpr int K = kBlockOf<float>;
  constexpr int64_t B = K * W;
  typedef Block<K> VB;
  const VecMath::PowConsts& c = s.pow;
  struct Front {
    __m256 y[K], t[K];
    bool fixup;
  };
  auto front = [&](int64_t k, Front& f) __attribute__((always_inline)) {
    prefetch_lines(pp + k, B);
    prefetch_lines(gp + k, B);
    prefetch_lines(mp + k, B);
    prefetch_lines(vp + k, B);
    if (AMS) prefetch_lines(xp + k, B);
    VB th = load_block<VB, false>(pp + k), g = load_block<VB, false>(gp + k);
    VB v = load_block<VB, false>(vp + k), x = {};
    VB m = load_block<VB, false>(mp + k);
    if (AMS) x = load_block<VB, false>(xp + k);
    const VB vv = GM ? smes_front<true, AMS, L2, VecMath>(th, g, m, v, x, s)
                     : smes_moments<true, AMS, L2, VecMath>(th, g, m, v, x, s);
    store_block<VB, false>(mp + k, m);
    store_block<VB, false>(vp + k, v);
    if (AMS) store_block<VB, false>(xp + k, x);
    f.fixup = VecMath::any_out_of_range(vv, c);  // the fast path is on (c.ok): see segment
    __m256 vk[K];
    for (int q = 0; q < K; ++q) vk[q] = (__m256)vv.x[q];
    VecMath::pow_log<D4, K>(vk, c, f.y, f.t);
  };
  // D = (v / bc2)^p + eps, as smes_direction
  auto middle = [&](int64_t k, const Front& f, VB& d, auto fix) __attribute__((always_inline)) {
    __m256 r[K];
    VecMath::pow_exp<D4, K>(f.y, f.t, c, r);
    VB pw;
    for (int q = 0; q < K; ++q) pw.x[q] = (V)r[q];
    if (decltype(fix)::value && f.fixup) {
      VecMath::pow_fixup(load_block<VB, false>((AMS ? xp : vp) + k), pw, c);
    }
    d = pw + s.eps;
  };
  auto back = [&](int64_t k, const VB& d) __attribute__((always_inline)) {
    const VB m = load_block<VB, false>(mp + k);
    // theta * decay - step_size * u as GCC contracts smes_update's last two lines in the other
    // loops, step_size * u fused into the subtraction: left to GCC, the same two lines here came
    // out with other roundings (test_step_does_not_depend_on_how_the_tensor_is_split failed)
    const VB th = load_block<VB, false>(pp + k) * s.decay;
    const VB u = VecMath::quot(m, d);
    VB r;
    for (int q = 0; q < K; ++q) {
      r.x[q] = (V)_mm256_fnmadd_ps(_mm256_set1_ps(s.step_size), (__m256)u.x[q], (__m256)th.x[q]);
    }
    store_block<VB, false>(pp + k, r);
  };
  Front f0, f1;
  VB d0, d1;
  front(i, f0);
  middle(i, f0, d0, BoolC<true>{});
  front(i + B, f1);
  // The steady state, while the blocks' v are in the fast path's range, has no fix-up code
  // (below); a block with v out of range takes one iteration with it, outside that loop.
  auto step = [&](auto fix) __attribute__((always_inline)) {
    Front f2;
    front(i + 2 * B, f2);
    middle(i + B, f1, d1, fix);
    back(i, d0);
    d0 = d1;
    f1 = f2;
    i += B;
  };
  while (i + 3 * B <= n) {
    while (i + 3 * B <= n && !f1.fixup) step(BoolC<false>{});
    if (i + 3 * B <= n) step(BoolC<true>{});
  }
  middle(i + B, f1, d1, BoolC<true>{});
  back(i, d0);
  back(i + B, d1);
  i += 2 * B;
}
#endif

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
    const KScalars s(j.s, PC == P_GENERAL);
    const int64_t n = hi - lo;
    int64_t i = 0;
    V v = {}, x = {};
    // bf16 params and state: even/odd pairs of vectors (load_pair)
    constexpr bool kPairs = SMES_W == 8 && __is_same(P, bf16) && __is_same(S, bf16);
    // a loop over pairs (SR a compile-time switch there), then over contiguous vectors
    auto pairs_then_contiguous = [&](auto loop) __attribute__((always_inline)) {
      if (kPairs && j.sr) loop(BoolC<kPairs>{}, BoolC<kPairs>{});
      if (kPairs && !j.sr) loop(BoolC<kPairs>{}, BoolC<false>{});
      loop(BoolC<false>{}, BoolC<false>{});
    };
#if SMES_W == 8
    if constexpr (PC == P_GENERAL) {
      // AVX2, general p: kBlock vectors per call of the rule (a Block), whose dependency chains
      // the out-of-order core overlaps (see VecMath::pow_hat).
      constexpr int kBlock = kBlockOf<P>;
      typedef Block<kBlock> VB;
      auto blocks = [&](auto pairs, auto sr) __attribute__((always_inline)) {
        constexpr bool PR = decltype(pairs)::value, SR = decltype(sr)::value;
        VB vb = {}, xb = {};
        for (; i + kBlock * W <= n; i += kBlock * W) {
          prefetch_lines(pp + i, kBlock * W);
          prefetch_lines(gp + i, kBlock * W);
          prefetch_lines(mp + i, kBlock * W);
          prefetch_lines(vp + i, kBlock * W);
          if (AMS) prefetch_lines(xp + i, kBlock * W);
          VB th = load_block<VB, PR>(pp + i), g = load_block<VB, PR>(gp + i);
          VB m = load_block<VB, PR>(mp + i);
          vb = load_block<VB, PR>(vp + i);
          if (AMS) xb = load_block<VB, PR>(xp + i);
          smes_update<PC, TV, AMS, L2, VecMath>(th, g, m, vb, xb, s);
          store_theta_block<VB, PR, SR>(pp + i, th, j, lo + i);
          store_block<VB, PR>(mp + i, m);
          store_block<VB, PR>(vp + i, vb);
          if (AMS) store_block<VB, PR>(xp + i, xb);
        }
      };
      if constexpr (__is_same(P, float) && __is_same(S, float)) {  // see general_p_pipeline
        if (n - i >= 3 * kBlock * W && s.pow.ok) {
          auto pipeline = [&](auto d4, auto gm) __attribute__((always_inline)) {
            general_p_pipeline<decltype(d4)::value, AMS, L2, decltype(gm)::value>(n, i, pp, gp,
                                                                                 mp, vp, xp, s);
          };
          // g * gmul left out where gmul is 1 and there is no L2 term (see general_p_pipeline)
          auto by_gmul = [&](auto d4) __attribute__((always_inline)) {
            if constexpr (L2) {
              pipeline(d4, BoolC<true>{});
            } else if (s.gmul != 1.0f) {
              pipeline(d4, BoolC<true>{});
            } else {
              pipeline(d4, BoolC<false>{});
            }
          };
          s.pow.d4 ? by_gmul(BoolC<true>{}) : by_gmul(BoolC<false>{});
        }
      }
      pairs_then_contiguous(blocks);
      // The rest as blocks of one vector: the same code for every element, so that a step is
      // bit-identical however a tensor is split (FSDP shards, thread segments). GCC contracts
      // a Block's a * b + c * d into an FMA the same way for every K, not always as for a V
      // (it evaluates an overloaded operator's operands in another order).
      typedef Block<1> V1;
      V1 v1 = {}, x1 = {};
      for (; i + W <= n; i += W) {
        V1 th = {{load(pp + i)}}, g = {{load(gp + i)}}, m = {{load(mp + i)}};
        v1.x[0] = load(vp + i);
        if (AMS) x1.x[0] = load(xp + i);
        smes_update<PC, TV, AMS, L2, VecMath>(th, g, m, v1, x1, s);
        store_theta(pp + i, th.x[0], j, lo + i);
        store(mp + i, m.x[0]);
        store(vp + i, v1.x[0]);
        if (AMS) store(xp + i, x1.x[0]);
      }
      if (i < n) {
        const int r = (int)(n - i);
        V1 th = {{load_n(pp + i, r)}}, g = {{load_n(gp + i, r)}}, m = {{load_n(mp + i, r)}};
        v1.x[0] = load_n(vp + i, r);
        if (AMS) x1.x[0] = load_n(xp + i, r);
        smes_update<PC, TV, AMS, L2, VecMath>(th, g, m, v1, x1, s);
        store_theta_n(pp + i, th.x[0], r, j, lo + i);
        store_n(mp + i, m.x[0], r);
        store_n(vp + i, v1.x[0], r);
        if (AMS) store_n(xp + i, x1.x[0], r);
        i = n;
      }
    }
#endif
    // Two vectors per iteration: two independent dependency chains (the general-p chain is
    // about 140 cycles long) keep the out-of-order window busy.
    auto pairs_of_vectors = [&](auto pairs, auto sr) __attribute__((always_inline)) {
      constexpr bool PR = decltype(pairs)::value, SR = decltype(sr)::value;
      typedef Block<2> V2;
      for (; i + 2 * W <= n; i += 2 * W) {
        const V2 th = load_block<V2, PR>(pp + i), g = load_block<V2, PR>(gp + i);
        const V2 m = load_block<V2, PR>(mp + i);
        V2 vv = {}, xx = {};
        if (TV) vv = load_block<V2, PR>(vp + i);
        if (AMS) xx = load_block<V2, PR>(xp + i);
        V th0 = th.x[0], th1 = th.x[1], m0 = m.x[0], m1 = m.x[1];
        V v0 = vv.x[0], v1 = vv.x[1], x0 = xx.x[0], x1 = xx.x[1];
        smes_update<PC, TV, AMS, L2, VecMath>(th0, g.x[0], m0, v0, x0, s);
        smes_update<PC, TV, AMS, L2, VecMath>(th1, g.x[1], m1, v1, x1, s);
        store_theta_block<V2, PR, SR>(pp + i, V2{{th0, th1}}, j, lo + i);
        store_block<V2, PR>(mp + i, V2{{m0, m1}});
        if (TV) store_block<V2, PR>(vp + i, V2{{v0, v1}});
        if (AMS) store_block<V2, PR>(xp + i, V2{{x0, x1}});
      }
    };
    pairs_then_contiguous(pairs_of_vectors);
    for (; i + W <= n; i += W) {
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
    const KScalars s(j.s, PC == P_GENERAL);
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
    const KScalars s(j.s, PC == P_GENERAL);
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
