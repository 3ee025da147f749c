// SMES CPU kernels for AVX-512 (F, BW, VL, DQ) with FMA and F16C: 16 floats per vector.
// Chosen at run time by smes_cpu.cpp; never built with -march=native.
#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include "smes_cpu_job.h"  // after the pragma: smes_math.h is compiled for this ISA

#define SMES_W 16
#define SMES_ISA_NS avx512
#define SMES_SQRT _mm512_sqrt_ps
#include "smes_cpu_kernel.h"

namespace smes {
namespace cpu {
namespace avx512 {
void step_range(const TensorJob* jobs, const int64_t* starts, int n, int64_t b, int64_t e) {
  run_range<dispatch>(jobs, starts, n, b, e);
}
void roofline_range(const TensorJob* jobs, const int64_t* starts, int n, int64_t b, int64_t e) {
  run_range<roofline_segment>(jobs, starts, n, b, e);
}
void stats_range(const TensorJob* jobs, const int64_t* starts, int n, int64_t b, int64_t e) {
  run_range<dispatch_stats>(jobs, starts, n, b, e);
}
void apply_range(const TensorJob* jobs, const int64_t* starts, int n, int64_t b, int64_t e) {
  run_range<dispatch_apply>(jobs, starts, n, b, e);
}
}  // namespace avx512
}  // namespace cpu
}  // namespace smes
#pragma GCC pop_options

smes::cpu::Kernels smes::cpu::kernels_avx512() {
  return {"avx512", &avx512::step_range, &avx512::roofline_range, &avx512::stats_range,
          &avx512::apply_range, &avx512::sr_noise_lanes};
}
