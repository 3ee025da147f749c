// Host interface of the CUDA kernels (csrc/smes_cuda.cu). Plain C++: no torch and no CUDA header
// needed to include it (cudaStream_t is passed as void*).
#pragma once
#include <cstdint>

#include "smes_math.h"

namespace smes {
namespace cuda {

// dtype of a device lr tensor (TensorArgs::lr_dtype).
enum LrDType : int { kLrF32 = 0, kLrF64 = 1, kLrBF16 = 2, kLrF16 = 3 };

// One tensor of a launch. Hyperparameters are per tensor (param groups never split a launch);
// step and (optionally) lr are read on the device, so the launch is capturable.
struct TensorArgs {
  void* p;              // param (P)
  const void* g;        // grad (P)
  void* m;              // exp_avg (S)
  void* v;              // exp_avg_sq (S), null when not tracked
  void* vmax;           // max_exp_avg_sq (S), null unless amsgrad
  const float* step;    // float32 step count on the device (already incremented)
  const void* lr_ptr;   // lr on the device (dtype lr_dtype), or null: use `lr`
  int64_t numel;
  double beta1, beta2;  // float64: the bias corrections are computed in float64
  float lr, eps, exponent, weight_decay;
  int flags;            // smes_math.h kFlag*
  int lr_dtype;         // LrDType of *lr_ptr
  // Projection (SPEC §4), launches of code & kProject only: rows (size(0) of a tensor of dim > 1,
  // 0 for a tensor never projected), the first row and the tensor's slot in the row buffers.
  float proj_delta, proj_wd_ratio;
  int64_t rows, row0, slot;
  // Stochastic rounding (kFlagSR in flags, bf16 params): the tensor's own seed (its group's XOR
  // its salt, smes_fused/_rounding.py).
  uint32_t rounding_seed;
};

// The projection's device buffers: 4 float row sums and 1 coefficient per row, 1 flag per tensor.
struct ProjBuffers {
  float* stats;
  float* k;
  int* projected;
};

// Advances the `n` float32 step counts on the device by one, unless *found_inf != 0 (found_inf
// may be null). ceil(n / 2048) launches (ceil(n / 480) before CUDA 12.1). Returns 0 or a
// cudaError_t.
int advance_steps(float* const* steps, int n, const float* found_inf, void* stream);

// Applies one SMES step to `n` tensors that share the variant `code` (smes_math.h) and the
// dtypes. grad_scale / found_inf: device float32 scalars or null. Returns 0 or a cudaError_t.
// Launches ceil(chunks / kMaxBlocksPerLaunch) kernels, chunks of 65536 elements.
int launch_step(const TensorArgs* tensors, int n, int code, int param_dtype, int state_dtype,
                const float* grad_scale, const float* found_inf, void* stream);

// The same for a projected launch group (code & kProject): the moments and row sums, the
// decision per tensor, the projected update (SPEC §4); `buf.stats` must be zero on entry and is
// left zero. Returns 0 or a cudaError_t.
int launch_projected(const TensorArgs* tensors, int n, int code, int param_dtype,
                     int state_dtype, const float* grad_scale, const float* found_inf,
                     ProjBuffers buf, void* stream);

}  // namespace cuda
}  // namespace smes
