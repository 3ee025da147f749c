// The CPU kernel's job table: plain structs shared by the torch binding (smes_cpu.cpp) and the
// per-ISA kernel translation units (smes_cpu_avx512.cpp, smes_cpu_avx2.cpp, smes_cpu_base.cpp),
// which include no torch header.
#pragma once
#include <cstdint>

#include "smes_math.h"

namespace smes {
namespace cpu {

struct TensorJob {
  void* p;           // param (P)
  const void* g;     // grad (P)
  void* m;           // exp_avg (S)
  void* v;           // exp_avg_sq (S) or null
  void* vmax;        // max_exp_avg_sq (S) or null
  int64_t numel;
  int code;          // variant code (smes_math.h)
  int pdt, sdt;      // param / state dtype codes
  Scalars s;
  // Projection (SPEC §4) passes only: row length, the tensor's row sums and row coefficients.
  int64_t row_len;
  double* stats;     // 4 per row
  const float* k;    // 1 per row
  // Stochastic rounding of theta (bf16 params, kFlagSR): on, and this step's key.
  bool sr;
  uint32_t sr_key;
};

// Applies elements [begin, end) of the concatenation of all jobs; starts[i] is the offset of job i
// (starts has n + 1 entries, starts[n] = total).
using RangeFn = void (*)(const TensorJob* jobs, const int64_t* starts, int n, int64_t begin,
                         int64_t end);

// One set of kernels per instruction set; `roofline` has the optimizer's memory pattern
// (read theta, g, m, v; write theta, m, v) with trivial math, float32 only.
struct Kernels {
  const char* isa;
  RangeFn step;
  RangeFn roofline;
  RangeFn proj_stats;  // the projection's first pass (moments and row sums)
  RangeFn proj_apply;  // its second pass (the projected update of theta)
  // stochastic rounding's noise of the lanes of a vector and of a pair; returns how many values
  // it wrote, 3 floats-per-vector (tests only)
  int (*sr_noise_lanes)(uint32_t key, int64_t index, uint32_t* out);
};

Kernels kernels_avx512();
Kernels kernels_avx2();
Kernels kernels_base();

}  // namespace cpu
}  // namespace smes
