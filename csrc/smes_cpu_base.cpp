// SMES CPU kernels for the x86-64 baseline (SSE2): 4 floats per vector.
// Chosen at run time by smes_cpu.cpp; never built with -march=native.
#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
// no target pragma: the compiler baseline (SSE2 on x86-64)
#include "smes_cpu_job.h"  // after the pragma: smes_math.h is compiled for this ISA

#define SMES_W 4
#define SMES_ISA_NS base
#define SMES_SQRT _mm_sqrt_ps
#include "smes_cpu_kernel.h"

namespace smes {
namespace cpu {
namespace base {
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
}  // namespace base
}  // namespace cpu
}  // namespace smes
#pragma GCC pop_options

smes::cpu::Kernels smes::cpu::kernels_base() {
  return {"base", &base::step_range, &base::roofline_range, &base::stats_range,
          &base::apply_range, &base::sr_noise_lanes};
}
