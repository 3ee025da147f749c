// TORCH_LIBRARY_IMPL(smes_fused, CUDA): validates a bucket, builds the per-tensor launch
// arguments on the host and calls the raw-pointer launcher of smes_cuda.cu. Compiled only when
// setup.py builds the CUDA kernels (SMES_WITH_CUDA).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <unordered_map>
#include <vector>

#include "smes_cuda.h"
#include "smes_math.h"
#include "smes_op_checks.h"

namespace smes {
namespace cuda {
namespace {

thread_local std::vector<TensorArgs> t_args;
thread_local std::vector<int> t_codes;
thread_local std::vector<TensorArgs> t_group;
thread_local std::vector<char> t_done;
thread_local std::vector<float*> t_steps;

// The projection's row buffers per device (SPEC §4), grown when a bucket needs more and kept:
// no allocation per step once they fit (a first capture in a CUDA graph allocates from its pool).
at::Tensor proj_scratch(const at::Device& dev, int64_t floats) {
  static thread_local std::unordered_map<int, at::Tensor> held;
  at::Tensor& t = held[dev.index()];
  if (!t.defined() || t.numel() < floats)
    t = at::empty({floats}, at::TensorOptions().device(dev).dtype(at::kFloat));
  return t;
}

// LrDType of a tensor lr the kernel can read in place, or -1.
int lr_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kLrF32;
    case at::kDouble: return kLrF64;
    case at::kBFloat16: return kLrBF16;
    case at::kHalf: return kLrF16;
    default: return -1;
  }
}

}  // namespace

void smes_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    const c10::List<std::optional<at::Tensor>>& exp_avg_sqs,
                    const c10::List<std::optional<at::Tensor>>& max_exp_avg_sqs,
                    at::TensorList steps, const at::Tensor& hypers,
                    const c10::List<std::optional<at::Tensor>>& lrs,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const int64_t n = (int64_t)params.size();
  if (n == 0) return;
  check_step_args(n, grads.size(), exp_avgs.size(), exp_avg_sqs.size(), max_exp_avg_sqs.size(),
                  steps.size(), hypers, lrs.size());
  const at::Device dev = params[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  const int pdt = dtype_code(params[0].scalar_type());
  const int sdt = dtype_code(exp_avgs[0].scalar_type());
  TORCH_CHECK(pdt >= 0 && (sdt == F32 || sdt == pdt),
              "smes_fused (cuda): params must be float32/bfloat16/float16 with float32 or "
              "param-dtype state");
  for (const auto* o : {&grad_scale, &found_inf}) {
    if (o->has_value())
      TORCH_CHECK((*o)->device() == dev && (*o)->scalar_type() == at::kFloat,
                  "smes_fused (cuda): grad_scale/found_inf must be float32 tensors on ", dev);
  }
  const double* hy = hypers.data_ptr<double>();
  t_args.resize(n);
  t_codes.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const double* h = hy + i * kHyperCols;
    TORCH_CHECK(p.device() == dev, "smes_fused (cuda): params[", i, "] is on ", p.device());
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type() &&
                    exp_avgs[i].scalar_type() == exp_avgs[0].scalar_type() &&
                    grads[i].scalar_type() == p.scalar_type(),
                "smes_fused (cuda): one launch takes one param dtype and one state dtype");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "smes_fused: layout: params[", i,
                "] is not dense");
    check_like(grads[i], p, "grads", i);
    check_like(exp_avgs[i], p, "exp_avgs", i);
    const int flags = (int)h[kFlags];
    int code = variant_code(h[kExponent], h[kWeightDecay], flags);
    if (flags & kFlagProjection) code |= kProject;
    TensorArgs& a = t_args[i];
    a.p = p.data_ptr();
    a.g = grads[i].data_ptr();
    a.m = exp_avgs[i].data_ptr();
    a.v = nullptr;
    a.vmax = nullptr;
    if (code & kTrackV) {
      TORCH_CHECK(exp_avg_sqs.size() == (size_t)n && exp_avg_sqs.get(i).has_value(),
                  "smes_fused: tensor ", i, " tracks v but exp_avg_sqs[", i, "] is missing");
      const at::Tensor v = *exp_avg_sqs.get(i);
      check_like(v, p, "exp_avg_sqs", i);
      TORCH_CHECK(v.scalar_type() == exp_avgs[i].scalar_type(), "smes_fused: state dtypes differ");
      a.v = v.data_ptr();
      if (code & kAmsgrad) {
        TORCH_CHECK(max_exp_avg_sqs.size() == (size_t)n && max_exp_avg_sqs.get(i).has_value(),
                    "smes_fused: tensor ", i, " uses amsgrad but max_exp_avg_sqs[", i,
                    "] is missing");
        const at::Tensor x = *max_exp_avg_sqs.get(i);
        check_like(x, p, "max_exp_avg_sqs", i);
        TORCH_CHECK(x.scalar_type() == exp_avgs[i].scalar_type(),
                    "smes_fused: state dtypes differ");
        a.vmax = x.data_ptr();
      }
    } else {
      TORCH_CHECK((code & kPClassMask) == P_ZERO, "smes_fused: tensor ", i,
                  " has a non-zero exponent but does not track exp_avg_sq");
    }
    const at::Tensor& st = steps[i];
    TORCH_CHECK(st.device() == dev && st.scalar_type() == at::kFloat && st.numel() == 1,
                "smes_fused (cuda): steps[", i, "] must be a one-element float32 tensor on ", dev);
    a.step = st.data_ptr<float>();
    a.lr_ptr = nullptr;
    a.lr_dtype = kLrF32;
    if (lrs.size() != 0) {
      const std::optional<at::Tensor> l = lrs.get(i);
      if (l.has_value()) {
        const int code = lr_dtype_code(l->scalar_type());
        TORCH_CHECK(l->device() == dev && code >= 0 && l->numel() == 1,
                    "smes_fused (cuda): a tensor lr must be a one-element float32, float64, "
                    "bfloat16 or float16 tensor on ", dev, ", got ", l->scalar_type(), " on ",
                    l->device());
        a.lr_ptr = l->data_ptr();
        a.lr_dtype = code;
      }
    }
    a.numel = p.numel();
    a.beta1 = h[kBeta1];
    a.beta2 = h[kBeta2];
    a.lr = (float)h[kLr];
    a.eps = (float)h[kEps];
    a.exponent = (float)h[kExponent];
    a.weight_decay = (float)h[kWeightDecay];
    a.flags = flags;
    a.proj_delta = (float)h[kProjDelta];
    a.proj_wd_ratio = (float)h[kProjWdRatio];
    a.rows = 0;
    a.row0 = 0;
    a.slot = 0;
    a.rounding_seed = static_cast<uint32_t>(h[kRoundingSeed]);
    if ((code & kProject) && p.dim() > 1 && p.numel() > 0) {
      TORCH_CHECK(p.is_contiguous(), "smes_fused: layout: params[", i,
                  "] is projected (projection=True) but not contiguous (strides ", p.strides(),
                  "): its rows are walked in memory order");
      a.rows = p.size(0);
    }
    t_codes[i] = code;
  }
  // The projection's buffers: rows and slots numbered over the bucket.
  int64_t total_rows = 0, slots = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!(t_codes[i] & kProject)) continue;
    t_args[i].row0 = total_rows;
    t_args[i].slot = slots++;
    total_rows += t_args[i].rows;
  }
  ProjBuffers pbuf{nullptr, nullptr, nullptr};
  if (slots > 0) {
    at::Tensor scratch = proj_scratch(dev, 5 * total_rows + slots + 4);
    pbuf.stats = scratch.data_ptr<float>();
    pbuf.k = pbuf.stats + 4 * total_rows;
    pbuf.projected = reinterpret_cast<int*>(pbuf.k + total_rows);
  }
  const float* gs = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  const float* fi = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  void* stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  // The kernel reads this step's count on the device: advance the counts first, in one launch
  // that leaves them where found_inf is set (torch's fused protocol, no host sync).
  t_steps.resize(n);
  for (int64_t i = 0; i < n; ++i) t_steps[i] = steps[i].data_ptr<float>();
  const int serr = advance_steps(t_steps.data(), (int)n, fi, stream);
  TORCH_CHECK(serr == 0, "smes_fused (cuda): step-count launch failed with CUDA error ", serr);
  if (pbuf.stats != nullptr)  // the row sums start at zero (a fill on the current stream)
    proj_scratch(dev, 0).narrow(0, 0, 4 * total_rows).zero_();
  // One launch (or a few, for very large buckets) per variant present, usually one in all.
  std::vector<TensorArgs>& group = t_group;
  std::vector<char>& done = t_done;
  done.assign(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (done[i]) continue;
    group.clear();
    for (int64_t j = i; j < n; ++j) {
      if (!done[j] && t_codes[j] == t_codes[i]) {
        group.push_back(t_args[j]);
        done[j] = 1;
      }
    }
    const int err =
        (t_codes[i] & kProject)
            ? launch_projected(group.data(), (int)group.size(), t_codes[i], pdt, sdt, gs, fi,
                               pbuf, stream)
            : launch_step(group.data(), (int)group.size(), t_codes[i], pdt, sdt, gs, fi, stream);
    TORCH_CHECK(err == 0, "smes_fused (cuda): kernel launch failed with CUDA error ", err);
  }
}

}  // namespace cuda
}  // namespace smes

TORCH_LIBRARY_IMPL(smes_fused, CUDA, m) { m.impl("smes_step_", &smes::cuda::smes_step_cuda); }
