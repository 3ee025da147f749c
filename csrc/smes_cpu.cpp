// smes_fused ops: schemas (TORCH_LIBRARY), the CPU implementation and the Python module stub.
//
//   smes_fused::smes_step_  applies one SMES step (SPEC §1) to a whole bucket in one parallel
//                           region; hyperparameters travel per tensor in a float64 CPU table.
//   smes_fused::roofline_   the optimizer's memory pattern with trivial math (benchmark roofline).
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "smes_cpu_job.h"
#include "smes_op_checks.h"

namespace smes {
namespace cpu {
namespace {

// The widest instruction set this CPU runs, or the one SMES_CPU_ISA names (avx512, avx2, base),
// capped at what the CPU supports.
const Kernels& pick_kernels() {
  static const Kernels k512 = kernels_avx512(), k2 = kernels_avx2(), kb = kernels_base();
  static const bool can2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  static const bool can512 = can2 && __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512dq");
  const char* want = std::getenv("SMES_CPU_ISA");
  if (want != nullptr && *want != '\0') {
    if (std::strcmp(want, "base") == 0) return kb;
    if (std::strcmp(want, "avx2") == 0) return can2 ? k2 : kb;
  }
  return can512 ? k512 : (can2 ? k2 : kb);
}

// Grain of the parallel split: below this many elements per thread, fewer threads.
constexpr int64_t kGrain = 32768;

// A scalar tensor's value as a double without a dispatcher round trip when it is a CPU float.
double scalar_value(const at::Tensor& t) {
  if (t.device().is_cpu()) {
    if (t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>();
    if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>();
  }
  return t.item<double>();
}

// Reused between calls (no allocation per step once the capacity is reached).
thread_local std::vector<TensorJob> t_jobs;
thread_local std::vector<int64_t> t_starts;
thread_local std::vector<double> t_steps;

void run(const Kernels& k, bool roofline, int64_t total) {
  const RangeFn fn = roofline ? k.roofline : k.step;
  const TensorJob* jobs = t_jobs.data();
  const int64_t* starts = t_starts.data();
  const int n = (int)t_jobs.size();
  if (total == 0) return;
  // ONE parallel region for the whole bucket: the concatenated element space split evenly.
  at::parallel_for(0, total, kGrain, [&](int64_t b, int64_t e) { fn(jobs, starts, n, b, e); });
}

}  // namespace

void smes_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   const c10::List<std::optional<at::Tensor>>& exp_avg_sqs,
                   const c10::List<std::optional<at::Tensor>>& max_exp_avg_sqs,
                   at::TensorList steps, const at::Tensor& hypers,
                   const c10::List<std::optional<at::Tensor>>& lrs,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  const int64_t n = (int64_t)params.size();
  check_step_args(n, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hypers, lrs);
  if (found_inf.has_value() && scalar_value(*found_inf) != 0.0) return;  // nothing changes
  float inv_scale = 1.f;
  if (grad_scale.has_value()) inv_scale = 1.f / (float)scalar_value(*grad_scale);

  const double* hy = hypers.data_ptr<double>();
  t_jobs.resize(n);
  t_starts.resize(n + 1);
  t_steps.resize(n);
  int64_t total = 0;
  // Validate everything before anything is mutated (SPEC §5).
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const double* h = hy + i * kHyperCols;
    TORCH_CHECK(p.device().is_cpu(), "smes_fused (cpu): params[", i, "] is on ", p.device());
    const int pdt = dtype_code(p.scalar_type());
    TORCH_CHECK(pdt >= 0, "smes_fused (cpu): params[", i, "] has dtype ", p.scalar_type(),
                "; supported: float32, bfloat16, float16");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "smes_fused: layout: params[", i,
                "] is not dense (strides ", p.strides(), ")");
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "smes_fused: grads[", i,
                "] has dtype ", grads[i].scalar_type(), " but its param has ", p.scalar_type());
    check_like(grads[i], p, "grads", i);
    const at::Tensor& m = exp_avgs[i];
    check_like(m, p, "exp_avgs", i);
    const int sdt = dtype_code(m.scalar_type());
    TORCH_CHECK(sdt == F32 || sdt == pdt, "smes_fused (cpu): exp_avgs[", i, "] has dtype ",
                m.scalar_type(), "; state must be float32 or the param's dtype");
    const int flags = (int)h[kFlags];
    const int code = variant_code(h[kExponent], h[kWeightDecay], flags);
    TensorJob& j = t_jobs[i];
    j.p = p.data_ptr();
    j.g = grads[i].data_ptr();
    j.m = m.data_ptr();
    j.v = nullptr;
    j.vmax = nullptr;
    if (code & kTrackV) {
      TORCH_CHECK(exp_avg_sqs.size() == (size_t)n && exp_avg_sqs.get(i).has_value(),
                  "smes_fused: tensor ", i, " tracks v but exp_avg_sqs[", i, "] is missing");
      const at::Tensor v = *exp_avg_sqs.get(i);
      check_like(v, p, "exp_avg_sqs", i);
      TORCH_CHECK(v.scalar_type() == m.scalar_type(), "smes_fused: exp_avg_sqs[", i,
                  "] has dtype ", v.scalar_type(), " but exp_avgs[", i, "] has ", m.scalar_type());
      j.v = v.data_ptr();
      if (code & kAmsgrad) {
        TORCH_CHECK(max_exp_avg_sqs.size() == (size_t)n && max_exp_avg_sqs.get(i).has_value(),
                    "smes_fused: tensor ", i, " uses amsgrad but max_exp_avg_sqs[", i,
                    "] is missing");
        const at::Tensor x = *max_exp_avg_sqs.get(i);
        check_like(x, p, "max_exp_avg_sqs", i);
        TORCH_CHECK(x.scalar_type() == m.scalar_type(), "smes_fused: max_exp_avg_sqs[", i,
                    "] has dtype ", x.scalar_type(), " but exp_avgs[", i, "] has ",
                    m.scalar_type());
        j.vmax = x.data_ptr();
      }
    } else {
      TORCH_CHECK((code & kPClassMask) == P_ZERO, "smes_fused: tensor ", i, " has exponent ",
                  h[kExponent], " != 0 but does not track exp_avg_sq");
    }
    const at::Tensor& st = steps[i];
    TORCH_CHECK(st.numel() == 1 && st.device().is_cpu() &&
                    (st.scalar_type() == at::kFloat || st.scalar_type() == at::kDouble),
                "smes_fused (cpu): steps[", i, "] must be a one-element float32 CPU tensor");
    const double step = scalar_value(st) + 1.0;  // this step's count
    t_steps[i] = step;
    double lr = h[kLr];
    if (lrs.size() != 0) {
      const std::optional<at::Tensor> l = lrs.get(i);
      if (l.has_value()) lr = scalar_value(*l);
    }
    j.numel = p.numel();
    j.code = code;
    j.pdt = pdt;
    j.sdt = sdt;
    j.s = make_scalars(
        lr, h[kBeta1], h[kBeta2], h[kEps], h[kExponent], h[kWeightDecay], flags, step, inv_scale,
        [](double a, double b) { return std::pow(a, b); },
        [](double a) { return std::sqrt(a); }, [](double a) { return std::log2(a); });
    t_starts[i] = total;
    total += j.numel;
  }
  t_starts[n] = total;
  // Everything is valid: advance the step counts (serially: no chunk reads them after this).
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& st = steps[i];
    if (st.scalar_type() == at::kFloat) {
      *st.data_ptr<float>() = (float)t_steps[i];
    } else {
      *st.data_ptr<double>() = t_steps[i];
    }
  }
  run(pick_kernels(), false, total);
}

void roofline_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "smes_fused: roofline_ lists must have the same length");
  t_jobs.resize(n);
  t_starts.resize(n + 1);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.is_contiguous(),
                "smes_fused: roofline_ takes contiguous float32 CPU tensors");
    check_like(grads[i], p, "grads", (int64_t)i);
    check_like(exp_avgs[i], p, "exp_avgs", (int64_t)i);
    check_like(exp_avg_sqs[i], p, "exp_avg_sqs", (int64_t)i);
    for (const at::Tensor* t : {&grads[i], &exp_avgs[i], &exp_avg_sqs[i]})
      TORCH_CHECK(t->scalar_type() == at::kFloat, "smes_fused: roofline_ takes float32 tensors");
    TensorJob& j = t_jobs[i];
    j = TensorJob{};
    j.p = p.data_ptr();
    j.g = grads[i].data_ptr();
    j.m = exp_avgs[i].data_ptr();
    j.v = exp_avg_sqs[i].data_ptr();
    j.numel = p.numel();
    j.s.step_size = 1e-30f;  // theta changes by a negligible amount
    t_starts[i] = total;
    total += j.numel;
  }
  t_starts[n] = total;
  run(pick_kernels(), true, total);
}

}  // namespace cpu
}  // namespace smes

TORCH_LIBRARY(smes_fused, m) {
  m.def(
      "smes_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)?[] exp_avg_sqs, Tensor(d!)?[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor hypers, "
      "Tensor?[] lrs, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "roofline_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs) -> ()");
}

TORCH_LIBRARY_IMPL(smes_fused, CPU, m) {
  m.impl("smes_step_", &smes::cpu::smes_step_cpu);
  m.impl("roofline_", &smes::cpu::roofline_cpu);
}

// The Python module smes_fused._C: importing it registers the ops above. It also tells which
// CPU kernel set runs (`cpu_isa()`), for the benchmarks and the tests.
static PyObject* smes_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(smes::cpu::pick_kernels().isa);
}
static PyObject* smes_has_cuda(PyObject*, PyObject*) {
#ifdef SMES_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}
static PyMethodDef smes_methods[] = {
    {"cpu_isa", smes_cpu_isa, METH_NOARGS, "The CPU kernel set in use: avx512, avx2 or base."},
    {"has_cuda", smes_has_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef smes_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, smes_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&smes_module); }
