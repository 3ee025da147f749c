// SMES CPU kernels for AVX2 with FMA and F16C: 8 floats per vector.
// Chosen at run time by smes_cpu.cpp; never built with -march=native.
#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// GCC's first scheduling pass (off by default on x86), register-pressure aware: it interleaves the
// independent chains of a block of vectors at general p, whose latency bounds the kernel (measured
// on a Zen 3 EPYC: 9-11% off the general-p step, p = 0.5 unchanged).
#pragma GCC optimize("schedule-insns", "sched-pressure")
#include "smes_cpu_job.h"  // after the pragma: smes_math.h is compiled for this ISA

#define SMES_W 8
#define SMES_ISA_NS avx2
#define SMES_SQRT _mm256_sqrt_ps
#include "smes_cpu_kernel.h"

namespace smes {
namespace cpu {
namespace avx2 {
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
}  // namespace avx2
}  // namespace cpu
}  // namespace smes
#pragma GCC pop_options

smes::cpu::Kernels smes::cpu::kernels_avx2() {
  return {"avx2", &avx2::step_range, &avx2::roofline_range, &avx2::stats_range,
          &avx2::apply_range, &avx2::sr_noise_lanes};
}
