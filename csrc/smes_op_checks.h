// Argument checks and table layout shared by the torch bindings of smes_fused::smes_step_ (CPU in
// smes_cpu.cpp, CUDA in smes_cuda_binding.cpp). Host code that includes torch headers; the
// kernels themselves never include this file.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/Exception.h>

#include <optional>

#include "smes_math.h"

namespace smes {

// Columns of the per-tensor hyperparameter table (float64, shape [n, kHyperCols], on the CPU).
enum HyperCol {
  kLr = 0,
  kBeta1,
  kBeta2,
  kEps,
  kExponent,
  kWeightDecay,
  kFlags,
  kProjDelta,    // projection_delta (SPEC §4)
  kProjWdRatio,  // projection_wd_ratio
  kRoundingSeed, // rounding_seed (stochastic rounding, kFlagSR)
  kHyperCols
};

// Storage dtype code of a tensor, or -1 when the kernels do not support it.
inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return F32;
    case at::kBFloat16: return BF16;
    case at::kHalf: return F16;
    default: return -1;
  }
}

// Same device, shape and strides as `ref`, so both can be walked as flat arrays. A stride
// mismatch is reported as "layout" (the Python backend then applies the bucket per tensor);
// anything else is an error.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* what, int64_t i) {
  TORCH_CHECK(t.device() == ref.device(), "smes_fused: ", what, "[", i, "] is on ", t.device(),
              " but its param is on ", ref.device());
  TORCH_CHECK(t.sizes() == ref.sizes(), "smes_fused: ", what, "[", i, "] has shape ", t.sizes(),
              " but its param has shape ", ref.sizes());
  TORCH_CHECK(t.strides() == ref.strides(), "smes_fused: layout: ", what, "[", i,
              "] has strides ", t.strides(), " but its param has strides ", ref.strides());
}

// The list lengths (optional lists may be empty) and the hyperparameter table of one smes_step_
// call of n tensors.
inline void check_step_args(int64_t n, size_t n_grads, size_t n_exp_avgs, size_t n_exp_avg_sqs,
                            size_t n_max_exp_avg_sqs, size_t n_steps, const at::Tensor& hypers,
                            size_t n_lrs) {
  const size_t un = (size_t)n;
  TORCH_CHECK(n_grads == un && n_exp_avgs == un && n_steps == un,
              "smes_fused: params, grads, exp_avgs and steps must have the same length");
  TORCH_CHECK(n_exp_avg_sqs == 0 || n_exp_avg_sqs == un,
              "smes_fused: exp_avg_sqs must be empty or as long as params");
  TORCH_CHECK(n_max_exp_avg_sqs == 0 || n_max_exp_avg_sqs == un,
              "smes_fused: max_exp_avg_sqs must be empty or as long as params");
  TORCH_CHECK(n_lrs == 0 || n_lrs == un, "smes_fused: lrs must be empty or as long as params");
  TORCH_CHECK(hypers.defined() && hypers.device().is_cpu() &&
                  hypers.scalar_type() == at::kDouble && hypers.dim() == 2 &&
                  hypers.size(0) == n && hypers.size(1) == kHyperCols && hypers.is_contiguous(),
              "smes_fused: hypers must be a contiguous float64 CPU tensor of shape [", n, ", ",
              (int)kHyperCols, "]");
}

}  // namespace smes
