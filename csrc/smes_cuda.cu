// SMES CUDA kernels: multi-tensor apply over a bucket (SPEC §3).
//
// No torch header here: raw pointers and cudaStream_t, so nvcc can compile (and CI can
// register-check) this file on a machine whose torch is CPU-only.
//
// Layout of a launch: the tensors are cut into chunks of kChunk elements; block b applies chunk
// meta.chunk[b] of tensor meta.tensor[b]. The metadata (tensor pointers and per-tensor
// hyperparameters) travels as one __grid_constant__ kernel parameter, so a launch needs no
// device allocation or copy and can be captured in a CUDA graph. CUDA >= 12.1 allows 32 KB of
// parameters (64 tensors, 1024 chunks per launch); older toolkits allow 4 KB, and the layout
// shrinks to fit (24 tensors, 256 chunks: more launches for large buckets, same results).
// SMES_SMALL_LAUNCH_META forces the small layout (the tests compile both).
// Indexing is 32-bit inside a chunk; the chunk's offset in its tensor is 64-bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "smes_cuda.h"
#include "smes_math.h"

namespace smes {
namespace cuda {
namespace {

constexpr int kChunk = 65536;        // elements per block
constexpr int kThreads = 512;
constexpr int kVec = 4;              // elements per thread per iteration (16 B of float32)
#if defined(SMES_SMALL_LAUNCH_META) || !defined(CUDART_VERSION) || CUDART_VERSION < 12010
constexpr int kMaxTensors = 16;      // per launch
constexpr int kMaxBlocks = 256;      // per launch
constexpr int kMaxSteps = 480;       // step counts per advance_steps launch
constexpr int kParamLimit = 4096;    // bytes of kernel parameters before CUDA 12.1
#else
constexpr int kMaxTensors = 64;      // per launch
constexpr int kMaxBlocks = 1024;     // per launch
constexpr int kMaxSteps = 2048;      // step counts per advance_steps launch
constexpr int kParamLimit = 32764;   // bytes of kernel parameters from CUDA 12.1 (Volta+)
#endif

struct StepMeta {
  float* step[kMaxSteps];
};
static_assert(sizeof(StepMeta) + sizeof(void*) + sizeof(int) <= kParamLimit,
              "kernel parameter limit");

// Advances every step count by one, unless found_inf is set (then nothing changes): one launch
// in place of a _foreach_add_ before the step and a _foreach_sub_ after it.
__global__ void advance_steps_kernel(const __grid_constant__ StepMeta meta, int n,
                                     const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) *meta.step[i] += 1.f;
}

struct LaunchMeta {
  TensorArgs t[kMaxTensors];
  uint8_t tensor[kMaxBlocks];
  int32_t chunk[kMaxBlocks];
};
// The metadata plus the two pointer arguments and the projection's buffers.
static_assert(sizeof(LaunchMeta) + 2 * sizeof(void*) + sizeof(ProjBuffers) <= kParamLimit,
              "kernel parameter limit");
static_assert(kMaxTensors <= 256, "meta.tensor is uint8_t");

struct DevMath {
  __device__ __forceinline__ static float sqrt(float x) { return sqrtf(x); }
  // (v/bc2)^p = v^p * bc2^-p; powf gives 0^p = inf for p < 0 and 0 for p > 0
  __device__ __forceinline__ static float pow_hat(float v, const Scalars& s) {
    return powf(v, s.p) * s.bc2_pow;
  }
  __device__ __forceinline__ static float quot(float m, float d) { return m / d; }
  __device__ __forceinline__ static float max_nan(float a, float b) {
    return (a < b || b != b) ? b : a;
  }
};

// Storage <-> float32.
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// theta to storage: stochastically rounded for bf16 params when `key_on` (see smes_math.h).
template <class T>
__device__ __forceinline__ T theta_to(float x, bool key_on, uint32_t key, int64_t index) {
  return from_f<T>(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 theta_to<__nv_bfloat16>(float x, bool key_on,
                                                                uint32_t key, int64_t index) {
  if (!key_on || !isfinite(x)) return __float2bfloat16_rn(x);
  const uint32_t bits = __float_as_uint(x) + sr_noise(key, static_cast<uint64_t>(index));
  return __ushort_as_bfloat16(static_cast<unsigned short>(bits >> 16));
}

// kVec elements as one aligned access (16 B for float32, 8 B for 16-bit types).
template <class T>
struct alignas(sizeof(T) * kVec) Pack {
  T x[kVec];
};
template <class T>
__device__ __forceinline__ void load4(float* out, const T* p) {
  Pack<T> v = *reinterpret_cast<const Pack<T>*>(p);
#pragma unroll
  for (int k = 0; k < kVec; ++k) out[k] = to_f(v.x[k]);
}
template <class T>
__device__ __forceinline__ void store4(T* p, const float* in) {
  Pack<T> v;
#pragma unroll
  for (int k = 0; k < kVec; ++k) v.x[k] = from_f<T>(in[k]);
  *reinterpret_cast<Pack<T>*>(p) = v;
}

template <class T>
__device__ __forceinline__ bool aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kVec)) == 0;
}

// A tensor lr of any float dtype, read where it lives (no cast kernel per step), else the host lr.
__device__ __forceinline__ double read_lr(const TensorArgs& ta) {
  if (ta.lr_ptr == nullptr) return ta.lr;
  switch (ta.lr_dtype) {
    case kLrF64: return *static_cast<const double*>(ta.lr_ptr);
    case kLrBF16: return static_cast<double>(__bfloat162float(*static_cast<const __nv_bfloat16*>(ta.lr_ptr)));
    case kLrF16: return static_cast<double>(__half2float(*static_cast<const __half*>(ta.lr_ptr)));
    default: return static_cast<double>(*static_cast<const float*>(ta.lr_ptr));
  }
}

struct DoublePow {
  __device__ double operator()(double a, double b) const { return pow(a, b); }
};
struct DoubleSqrt {
  __device__ double operator()(double a) const { return ::sqrt(a); }
};
struct DoubleLog2 {
  __device__ double operator()(double a) const { return ::log2(a); }
};

// Adds one value per lane to row sums: one atomic per warp when the whole warp is active and on
// one row (the usual case: rows are longer than a warp), else one per lane.
__device__ __forceinline__ void row_add(float* p, float x, int64_t row) {
  const unsigned active = __activemask();
  const long long r0 = __shfl_sync(active, (long long)row, __ffs(active) - 1);
  if (active == 0xffffffffu && __all_sync(active, row == r0)) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(active, x, o);
    if ((threadIdx.x & 31) == 0) atomicAdd(p, x);
  } else {
    atomicAdd(p, x);
  }
}

// One chunk of one tensor. PHASE 0: the step. The projection's passes (SPEC §4): 1, the moments
// (stored) and the row sums (g.theta, g.g, theta.theta, theta.u) added to buf.stats, theta not
// written; 2, u <- u - k_row theta and theta written, with the projected decay where the decision
// kernel projected the tensor.
template <class P, class S, int PC, bool TV, bool AMS, bool L2, int PHASE>
__device__ __forceinline__ void apply_chunk(const TensorArgs& ta, int64_t base, int n,
                                            const Scalars& s, const ProjBuffers& buf) {
  P* __restrict__ pp = static_cast<P*>(ta.p) + base;
  const P* __restrict__ gp = static_cast<const P*>(ta.g) + base;
  S* __restrict__ mp = static_cast<S*>(ta.m) + base;
  S* __restrict__ vp = TV ? static_cast<S*>(ta.v) + base : nullptr;
  S* __restrict__ xp = AMS ? static_cast<S*>(ta.vmax) + base : nullptr;

  const bool sr = (ta.flags & kFlagSR) != 0;
  const uint32_t key = sr ? sr_key(ta.rounding_seed, static_cast<uint32_t>(*ta.step)) : 0u;
  if constexpr (PHASE != 0) {
    // Row length and row of an element without 64-bit integer division (a subroutine that
    // spills): a float64 quotient, corrected to the exact floor.
    const int64_t len = ta.rows > 0 ? static_cast<int64_t>(ta.numel / static_cast<double>(ta.rows) + 0.5) : 1;
    const double inv_len = 1.0 / static_cast<double>(len);
    const float decay = (PHASE == 2 && buf.projected[ta.slot]) ? s.decay_proj : s.decay;
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int64_t a = base + i;
      int64_t r = static_cast<int64_t>(static_cast<double>(a) * inv_len);
      r -= (r * len > a);
      r += ((r + 1) * len <= a);
      float th = to_f(pp[i]), m = to_f(mp[i]), v = 0.f, x = 0.f;
      if (TV) v = to_f(vp[i]);
      if (AMS) x = to_f(xp[i]);
      if (PHASE == 1) {
        float g = to_f(gp[i]) * s.gmul;
        const float gt = g * th, gg = g * g, tt = th * th;
        const float vv = smes_moments<TV, AMS, L2, DevMath>(th, g, m, v, x, s);
        const float tu = th * smes_direction<PC, DevMath>(m, vv, s);
        mp[i] = from_f<S>(m);
        if (TV) vp[i] = from_f<S>(v);
        if (AMS) xp[i] = from_f<S>(x);
        if (ta.rows > 0) {
          float* st = buf.stats + 4 * (ta.row0 + r);
          row_add(st, gt, r);
          row_add(st + 1, gg, r);
          row_add(st + 2, tt, r);
          row_add(st + 3, tu, r);
        }
      } else {
        const float vv = TV ? (AMS ? x : v) : m;
        const float k = ta.rows > 0 ? buf.k[ta.row0 + r] : 0.f;
        const float u = smes_direction<PC, DevMath>(m, vv, s) - k * th;
        pp[i] = theta_to<P>(th * decay - s.step_size * u, sr, key, base + i);
      }
    }
    return;
  }

  const bool vec = !sr && (n % kVec == 0) && aligned<P>(pp) && aligned<P>(gp) && aligned<S>(mp) &&
                   (!TV || aligned<S>(vp)) && (!AMS || aligned<S>(xp));
  if (vec) {
    for (int i = threadIdx.x * kVec; i < n; i += kThreads * kVec) {
      float th[kVec], g[kVec], m[kVec], v[kVec], x[kVec];
      load4(th, pp + i);
      load4(g, gp + i);
      load4(m, mp + i);
      if (TV) load4(v, vp + i);
      if (AMS) load4(x, xp + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) smes_update<PC, TV, AMS, L2, DevMath>(th[k], g[k], m[k], v[k], x[k], s);
      store4(pp + i, th);
      store4(mp + i, m);
      if (TV) store4(vp + i, v);
      if (AMS) store4(xp + i, x);
    }
  } else {
    for (int i = threadIdx.x; i < n; i += kThreads) {
      float th = to_f(pp[i]), g = to_f(gp[i]), m = to_f(mp[i]), v = 0.f, x = 0.f;
      if (TV) v = to_f(vp[i]);
      if (AMS) x = to_f(xp[i]);
      smes_update<PC, TV, AMS, L2, DevMath>(th, g, m, v, x, s);
      pp[i] = theta_to<P>(th, sr, key, base + i);
      mp[i] = from_f<S>(m);
      if (TV) vp[i] = from_f<S>(v);
      if (AMS) xp[i] = from_f<S>(x);
    }
  }
}

template <class P, class S, int PC, bool TV, bool AMS, bool L2, int PHASE>
__global__ void __launch_bounds__(kThreads)
    smes_step_kernel(const __grid_constant__ LaunchMeta meta, const float* grad_scale,
                     const float* found_inf, const ProjBuffers buf) {
  if (found_inf != nullptr && *found_inf != 0.f) return;  // nothing changes
  const TensorArgs& ta = meta.t[meta.tensor[blockIdx.x]];
  const int64_t base = static_cast<int64_t>(meta.chunk[blockIdx.x]) * kChunk;  // 64-bit offset
  const int64_t left = ta.numel - base;
  const int n = left < kChunk ? static_cast<int>(left) : kChunk;                 // 32-bit inside

  const float inv_scale = grad_scale != nullptr ? 1.f / *grad_scale : 1.f;
  const double lr = read_lr(ta);
  Scalars s = make_scalars(lr, ta.beta1, ta.beta2, ta.eps, ta.exponent, ta.weight_decay,
                           ta.flags, static_cast<double>(*ta.step), inv_scale, DoublePow(),
                           DoubleSqrt(), DoubleLog2(), ta.proj_wd_ratio);
  // Rectification before rho_t > 5 (SPEC §4): this step is u = m-hat (the p = 0 rule with d0 = 1,
  // as RAdam), v still updated.
  if (PC != P_ZERO && !s.adaptive) {
    s.d0 = 1.f;
    apply_chunk<P, S, P_ZERO, TV, AMS, L2, PHASE>(ta, base, n, s, buf);
  } else
    apply_chunk<P, S, PC, TV, AMS, L2, PHASE>(ta, base, n, s, buf);
}

// The projection's decision (SPEC §4), one block per tensor: per-row |cos| and sums reduced over
// the block in double, then k per row and the tensor's projected flag.
constexpr int kDecideThreads = 256;
struct DecideMeta {
  TensorArgs t[kMaxTensors];
};
static_assert(sizeof(DecideMeta) + sizeof(ProjBuffers) <= kParamLimit, "kernel parameter limit");

__global__ void __launch_bounds__(kDecideThreads)
    decide_kernel(const __grid_constant__ DecideMeta meta, const ProjBuffers buf) {
  const TensorArgs& ta = meta.t[blockIdx.x];
  if (ta.rows == 0) {
    if (threadIdx.x == 0) buf.projected[ta.slot] = 0;
    return;
  }
  const double eps = ta.eps;
  __shared__ double red[5][kDecideThreads];
  __shared__ int nan_seen;
  if (threadIdx.x == 0) nan_seen = 0;
  __syncthreads();
  double mc = 0.0, gt = 0.0, gg = 0.0, tt = 0.0, tu = 0.0;
  for (int64_t r = threadIdx.x; r < ta.rows; r += kDecideThreads) {
    const float* x = buf.stats + 4 * (ta.row0 + r);
    const double c = projection_cos(x[0], x[1], x[2], eps);
    if (c != c) nan_seen = 1;
    mc = c > mc ? c : mc;
    gt += x[0];
    gg += x[1];
    tt += x[2];
    tu += x[3];
  }
  red[0][threadIdx.x] = mc;
  red[1][threadIdx.x] = gt;
  red[2][threadIdx.x] = gg;
  red[3][threadIdx.x] = tt;
  red[4][threadIdx.x] = tu;
  __syncthreads();
  for (int o = kDecideThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) {
      const int j = threadIdx.x + o;
      red[0][threadIdx.x] = red[0][j] > red[0][threadIdx.x] ? red[0][j] : red[0][threadIdx.x];
      for (int q = 1; q < 5; ++q) red[q][threadIdx.x] += red[q][j];
    }
    __syncthreads();
  }
  const int64_t len = ta.numel / ta.rows;
  const bool by_row = !nan_seen && red[0][0] < ta.proj_delta / sqrt((double)len);
  const bool by_layer =
      !by_row && projection_cos(red[1][0], red[2][0], red[3][0], eps) <
                     ta.proj_delta / sqrt((double)ta.numel);
  const double kl = by_layer ? projection_k(red[3][0], red[4][0], eps) : 0.0;
  for (int64_t r = threadIdx.x; r < ta.rows; r += kDecideThreads) {
    const float* x = buf.stats + 4 * (ta.row0 + r);
    buf.k[ta.row0 + r] = by_row ? (float)projection_k(x[2], x[3], eps) : (float)kl;
  }
  if (threadIdx.x == 0) buf.projected[ta.slot] = (by_row || by_layer) ? 1 : 0;
}

// Fills `meta` with as many chunks as fit and launches; returns 0 or a cudaError_t.
template <class P, class S, int PC, bool TV, bool AMS, bool L2, int PHASE = 0>
int launch_all(const TensorArgs* tensors, int n, const float* grad_scale,
               const float* found_inf, cudaStream_t stream, ProjBuffers buf = {}) {
  if constexpr (PC != P_ZERO && !TV) {
    return static_cast<int>(cudaErrorInvalidValue);  // p != 0 needs v
  } else {
    LaunchMeta meta;
    int nt = 0, nb = 0;
    auto flush = [&]() -> int {
      if (nb == 0) return 0;
      smes_step_kernel<P, S, PC, TV, AMS, L2, PHASE>
          <<<nb, kThreads, 0, stream>>>(meta, grad_scale, found_inf, buf);
      nt = 0;
      nb = 0;
      return static_cast<int>(cudaGetLastError());
    };
    for (int i = 0; i < n; ++i) {
      const int64_t chunks = (tensors[i].numel + kChunk - 1) / kChunk;
      if (chunks == 0) continue;
      for (int64_t c = 0; c < chunks; ++c) {
        if (c == 0 || nt == 0) {
          if (nt == kMaxTensors) {
            if (int err = flush()) return err;
          }
          meta.t[nt++] = tensors[i];
        }
        meta.tensor[nb] = static_cast<uint8_t>(nt - 1);
        meta.chunk[nb] = static_cast<int32_t>(c);
        if (++nb == kMaxBlocks) {
          if (int err = flush()) return err;
        }
      }
    }
    return flush();
  }
}

// The projection's three launches (one set per kMaxTensors tensors for the decision).
template <class P, class S, int PC, bool TV, bool AMS, bool L2>
int launch_proj(const TensorArgs* tensors, int n, const float* grad_scale, const float* found_inf,
                cudaStream_t stream, ProjBuffers buf) {
  if constexpr (PC != P_ZERO && !TV) {
    return static_cast<int>(cudaErrorInvalidValue);
  } else {
    if (int err = launch_all<P, S, PC, TV, AMS, L2, 1>(tensors, n, grad_scale, found_inf, stream, buf))
      return err;
    DecideMeta meta;
    for (int start = 0; start < n; start += kMaxTensors) {
      const int count = n - start < kMaxTensors ? n - start : kMaxTensors;
      for (int i = 0; i < count; ++i) meta.t[i] = tensors[start + i];
      decide_kernel<<<count, kDecideThreads, 0, stream>>>(meta, buf);
      if (int err = static_cast<int>(cudaGetLastError())) return err;
    }
    return launch_all<P, S, PC, TV, AMS, L2, 2>(tensors, n, grad_scale, found_inf, stream, buf);
  }
}

// A launch of one variant: the plain step, or (buf.stats set) the projection's launches.
template <class P, class S, int PC, bool TV, bool AMS, bool L2>
int launch_variant(const TensorArgs* t, int n, const float* gs, const float* fi, cudaStream_t st,
                   const ProjBuffers& buf) {
  if (buf.stats != nullptr) return launch_proj<P, S, PC, TV, AMS, L2>(t, n, gs, fi, st, buf);
  return launch_all<P, S, PC, TV, AMS, L2>(t, n, gs, fi, st);
}

template <class P, class S, int PC, bool TV, bool AMS>
int by_l2(const TensorArgs* t, int n, int code, const float* gs, const float* fi, cudaStream_t st,
          const ProjBuffers& buf) {
  return (code & kL2) ? launch_variant<P, S, PC, TV, AMS, true>(t, n, gs, fi, st, buf)
                      : launch_variant<P, S, PC, TV, AMS, false>(t, n, gs, fi, st, buf);
}
template <class P, class S, int PC>
int by_state(const TensorArgs* t, int n, int code, const float* gs, const float* fi,
             cudaStream_t st, const ProjBuffers& buf) {
  if (!(code & kTrackV)) return by_l2<P, S, PC, false, false>(t, n, code, gs, fi, st, buf);
  if (code & kAmsgrad) return by_l2<P, S, PC, true, true>(t, n, code, gs, fi, st, buf);
  return by_l2<P, S, PC, true, false>(t, n, code, gs, fi, st, buf);
}
template <class P, class S>
int by_pclass(const TensorArgs* t, int n, int code, const float* gs, const float* fi,
              cudaStream_t st, const ProjBuffers& buf) {
  switch (code & kPClassMask) {
    case P_ZERO: return by_state<P, S, P_ZERO>(t, n, code, gs, fi, st, buf);
    case P_HALF: return by_state<P, S, P_HALF>(t, n, code, gs, fi, st, buf);
    default: return by_state<P, S, P_GENERAL>(t, n, code, gs, fi, st, buf);
  }
}

int dispatch(const TensorArgs* tensors, int n, int code, int param_dtype, int state_dtype,
             const float* gs, const float* fi, cudaStream_t st, const ProjBuffers& buf) {
  switch (param_dtype * 3 + state_dtype) {
    case F32 * 3 + F32: return by_pclass<float, float>(tensors, n, code, gs, fi, st, buf);
    case BF16 * 3 + F32:
      return by_pclass<__nv_bfloat16, float>(tensors, n, code, gs, fi, st, buf);
    case F16 * 3 + F32: return by_pclass<__half, float>(tensors, n, code, gs, fi, st, buf);
    case BF16 * 3 + BF16:
      return by_pclass<__nv_bfloat16, __nv_bfloat16>(tensors, n, code, gs, fi, st, buf);
    case F16 * 3 + F16: return by_pclass<__half, __half>(tensors, n, code, gs, fi, st, buf);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int advance_steps(float* const* steps, int n, const float* found_inf, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  StepMeta meta;
  for (int start = 0; start < n; start += kMaxSteps) {
    const int count = n - start < kMaxSteps ? n - start : kMaxSteps;
    for (int i = 0; i < count; ++i) meta.step[i] = steps[start + i];
    advance_steps_kernel<<<(count + 255) / 256, 256, 0, st>>>(meta, count, found_inf);
    if (int err = static_cast<int>(cudaGetLastError())) return err;
  }
  return 0;
}

int launch_step(const TensorArgs* tensors, int n, int code, int param_dtype, int state_dtype,
                const float* grad_scale, const float* found_inf, void* stream) {
  return dispatch(tensors, n, code, param_dtype, state_dtype, grad_scale, found_inf,
                  static_cast<cudaStream_t>(stream), ProjBuffers{});
}

int launch_projected(const TensorArgs* tensors, int n, int code, int param_dtype,
                     int state_dtype, const float* grad_scale, const float* found_inf,
                     ProjBuffers buf, void* stream) {
  if (buf.stats == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch(tensors, n, code, param_dtype, state_dtype, grad_scale, found_inf,
                  static_cast<cudaStream_t>(stream), buf);
}

}  // namespace cuda
}  // namespace smes
