// smes_fused ops: schemas (TORCH_LIBRARY), the CPU implementation and the Python module stub.
//
//   smes_fused::smes_step_  applies one SMES step (SPEC §1) to a whole bucket in one parallel
//                           region; hyperparameters travel per tensor in a float64 CPU table.
//   smes_fused::roofline_   the optimizer's memory pattern with trivial math (benchmark roofline).
#include <Python.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "smes_cpu_job.h"
#include "smes_op_checks.h"

namespace smes {
namespace cpu {
namespace {

// The widest instruction set this CPU runs, or the one SMES_CPU_ISA names (avx512, avx2, base),
// capped at what the CPU supports; any other value is an error (a typo would otherwise run the
// widest set unnoticed). Read on every call, before a step changes anything.
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
    TORCH_CHECK(std::strcmp(want, "avx512") == 0, "smes_fused: SMES_CPU_ISA='", want,
                "' is not a CPU kernel set; use avx512, avx2 or base, or unset it");
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
// The projection's tensors (SPEC §4): their jobs, element offsets, first rows, row sums and
// row coefficients.
thread_local std::vector<TensorJob> t_pjobs;
thread_local std::vector<int64_t> t_pstarts;
thread_local std::vector<int64_t> t_prows;
thread_local std::vector<double> t_pstats;
thread_local std::vector<float> t_pk;
thread_local std::vector<const double*> t_phyper;

void run_jobs(RangeFn fn, const std::vector<TensorJob>& jobs, const std::vector<int64_t>& starts,
              int64_t total) {
  if (total == 0) return;
  const TensorJob* j = jobs.data();
  const int64_t* st = starts.data();
  const int n = (int)jobs.size();
  // ONE parallel region for the whole bucket: the concatenated element space split evenly.
  at::parallel_for(0, total, kGrain, [&](int64_t b, int64_t e) { fn(j, st, n, b, e); });
}

void run(const Kernels& k, bool roofline, int64_t total) {
  run_jobs(roofline ? k.roofline : k.step, t_jobs, t_starts, total);
}

// The projected tensors' step: the moments and row sums (one parallel region), the decision
// per tensor, the update of theta (a second parallel region).
void run_projected(const Kernels& k, int64_t total) {
  const size_t n = t_pjobs.size();
  if (n == 0) return;
  const int64_t rows = t_prows[n];
  t_pstats.assign(4 * rows, 0.0);  // capacity kept between steps
  t_pk.resize(rows);
  for (size_t i = 0; i < n; ++i) {
    t_pjobs[i].stats = t_pstats.data() + 4 * t_prows[i];
    t_pjobs[i].k = t_pk.data() + t_prows[i];
  }
  run_jobs(k.proj_stats, t_pjobs, t_pstarts, total);
  for (size_t i = 0; i < n; ++i) {
    TensorJob& j = t_pjobs[i];
    const double* h = t_phyper[i];
    const int64_t r = t_prows[i + 1] - t_prows[i];
    if (projection_coefficients(j.stats, r, j.row_len, h[kProjDelta], h[kEps],
                                t_pk.data() + t_prows[i]))
      j.s.decay = j.s.decay_proj;
  }
  run_jobs(k.proj_apply, t_pjobs, t_pstarts, total);
}

// One list argument as the kernels read it: entry i is a tensor, or an undefined tensor where the
// caller passed None; an empty list has size 0. It points at tensors the caller keeps alive.
class Seq {
 public:
  size_t size() const { return ptrs_.size(); }
  const at::Tensor& operator[](size_t i) const { return *ptrs_[i]; }

  // From the op's arguments.
  const Seq& of(at::TensorList l) {
    ptrs_.resize(l.size());
    for (size_t i = 0; i < l.size(); ++i) ptrs_[i] = &l[i];
    return *this;
  }
  const Seq& of(const c10::List<std::optional<at::Tensor>>& l) {
    held_.resize(l.size());
    ptrs_.resize(l.size());
    for (size_t i = 0; i < l.size(); ++i) {
      std::optional<at::Tensor> t = l.get(i);
      held_[i] = t.has_value() ? std::move(*t) : at::Tensor();
      ptrs_[i] = &held_[i];
    }
    return *this;
  }
  // Drops the tensors of(c10::List) copied (so that a finished call keeps nothing alive).
  void release() { held_.clear(); }
  // From a Python tuple of plain tensors or None (see direct()); false if an entry is anything
  // else (a tensor subclass, a tensor the dispatcher must see).
  bool of_python(PyObject* tuple, bool none_ok);

 private:
  std::vector<const at::Tensor*> ptrs_;
  std::vector<at::Tensor> held_;
};

// Reused between calls (no allocation per step once the capacity is reached).
enum { kParams, kGrads, kExpAvgs, kExpAvgSqs, kMaxExpAvgSqs, kSteps, kLrs, kNumSeqs };
thread_local Seq t_seqs[kNumSeqs];

// SPEC §1 for one bucket: everything is validated before anything is written (SPEC §5).
void step_bucket(const Seq& params, const Seq& grads, const Seq& exp_avgs, const Seq& exp_avg_sqs,
                 const Seq& max_exp_avg_sqs, const Seq& steps, const at::Tensor& hypers,
                 const Seq& lrs, const at::Tensor* grad_scale, const at::Tensor* found_inf) {
  const int64_t n = (int64_t)params.size();
  check_step_args(n, grads.size(), exp_avgs.size(), exp_avg_sqs.size(), max_exp_avg_sqs.size(),
                  steps.size(), hypers, lrs.size());
  if (found_inf != nullptr && scalar_value(*found_inf) != 0.0) return;  // nothing changes
  float inv_scale = 1.f;
  if (grad_scale != nullptr) inv_scale = 1.f / (float)scalar_value(*grad_scale);

  const double* hy = hypers.data_ptr<double>();
  t_jobs.resize(n);
  t_starts.resize(n + 1);
  t_steps.resize(n);
  t_pjobs.clear();
  t_pstarts.assign(1, 0);
  t_prows.assign(1, 0);
  t_phyper.clear();
  int64_t total = 0;
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
      TORCH_CHECK(exp_avg_sqs.size() == (size_t)n && exp_avg_sqs[i].defined(),
                  "smes_fused: tensor ", i, " tracks v but exp_avg_sqs[", i, "] is missing");
      const at::Tensor& v = exp_avg_sqs[i];
      check_like(v, p, "exp_avg_sqs", i);
      TORCH_CHECK(v.scalar_type() == m.scalar_type(), "smes_fused: exp_avg_sqs[", i,
                  "] has dtype ", v.scalar_type(), " but exp_avgs[", i, "] has ", m.scalar_type());
      j.v = v.data_ptr();
      if (code & kAmsgrad) {
        TORCH_CHECK(max_exp_avg_sqs.size() == (size_t)n && max_exp_avg_sqs[i].defined(),
                    "smes_fused: tensor ", i, " uses amsgrad but max_exp_avg_sqs[", i,
                    "] is missing");
        const at::Tensor& x = max_exp_avg_sqs[i];
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
    if (lrs.size() != 0 && lrs[i].defined()) lr = scalar_value(lrs[i]);
    TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "Invalid learning rate: ", lr, " for tensor ", i,
                "; expected a finite lr >= 0");
    j.numel = p.numel();
    j.code = code;
    j.pdt = pdt;
    j.sdt = sdt;
    j.s = make_scalars(
        lr, h[kBeta1], h[kBeta2], h[kEps], h[kExponent], h[kWeightDecay], flags, step, inv_scale,
        [](double a, double b) { return std::pow(a, b); },
        [](double a) { return std::sqrt(a); }, [](double a) { return std::log2(a); },
        h[kProjWdRatio]);
    // Rectification before rho_t > 5: this step is u = m-hat (the p = 0 rule with d0 = 1, as
    // RAdam; v is still updated).
    if (!j.s.adaptive) {
      j.code = (j.code & ~kPClassMask) | P_ZERO;
      j.s.d0 = 1.f;
    }
    j.sr = (flags & kFlagSR) && pdt == BF16;
    j.sr_key = j.sr ? sr_key((uint32_t)h[kRoundingSeed], (uint32_t)step) : 0u;
    t_starts[i] = total;
    if ((flags & kFlagProjection) && p.dim() > 1 && j.numel > 0) {
      // Projected (SPEC §4): two passes over its rows, after the other tensors.
      TORCH_CHECK(p.is_contiguous(), "smes_fused: layout: params[", i,
                  "] is projected (projection=True) but not contiguous (strides ", p.strides(),
                  "): its rows are walked in memory order");
      j.row_len = j.numel / p.size(0);
      t_pjobs.push_back(j);
      t_pstarts.push_back(t_pstarts.back() + j.numel);
      t_prows.push_back(t_prows.back() + p.size(0));
      t_phyper.push_back(h);
      j.numel = 0;
    }
    total += j.numel;
  }
  t_starts[n] = total;
  const Kernels& k = pick_kernels();
  // Everything is valid: advance the step counts (serially: no chunk reads them after this).
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& st = steps[i];
    if (st.scalar_type() == at::kFloat) {
      *st.data_ptr<float>() = (float)t_steps[i];
    } else {
      *st.data_ptr<double>() = t_steps[i];
    }
  }
  run(k, false, total);
  run_projected(k, t_pstarts.back());
}

void roofline_bucket(const Seq& params, const Seq& grads, const Seq& exp_avgs,
                     const Seq& exp_avg_sqs) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "smes_fused: roofline_ lists must have the same length");
  t_jobs.resize(n);
  t_starts.resize(n + 1);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined() && p.device().is_cpu() && p.scalar_type() == at::kFloat &&
                    p.is_contiguous(),
                "smes_fused: roofline_ takes contiguous float32 CPU tensors");
    for (const at::Tensor* t : {&grads[i], &exp_avgs[i], &exp_avg_sqs[i]})
      TORCH_CHECK(t->defined() && t->scalar_type() == at::kFloat,
                  "smes_fused: roofline_ takes float32 tensors");
    check_like(grads[i], p, "grads", (int64_t)i);
    check_like(exp_avgs[i], p, "exp_avgs", (int64_t)i);
    check_like(exp_avg_sqs[i], p, "exp_avg_sqs", (int64_t)i);
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

// ------------------------------------------------------------------ the registered ops

void smes_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   const c10::List<std::optional<at::Tensor>>& exp_avg_sqs,
                   const c10::List<std::optional<at::Tensor>>& max_exp_avg_sqs,
                   at::TensorList steps, const at::Tensor& hypers,
                   const c10::List<std::optional<at::Tensor>>& lrs,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  Seq* s = t_seqs;
  struct Release {
    Seq* s;
    ~Release() {
      for (int k : {kExpAvgSqs, kMaxExpAvgSqs, kLrs}) s[k].release();
    }
  } release{s};
  step_bucket(s[kParams].of(params), s[kGrads].of(grads), s[kExpAvgs].of(exp_avgs),
              s[kExpAvgSqs].of(exp_avg_sqs), s[kMaxExpAvgSqs].of(max_exp_avg_sqs),
              s[kSteps].of(steps), hypers, s[kLrs].of(lrs),
              grad_scale.has_value() ? &*grad_scale : nullptr,
              found_inf.has_value() ? &*found_inf : nullptr);
}

void roofline_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs) {
  Seq* s = t_seqs;
  roofline_bucket(s[kParams].of(params), s[kGrads].of(grads), s[kExpAvgs].of(exp_avgs),
                  s[kExpAvgSqs].of(exp_avg_sqs));
}

// ------------------------------------------------------------------ the direct eager entry
//
// torch.ops converts every list entry to an IValue against the schema (~120 ns per entry: with
// five lists of 2000 tensors, more than a millisecond per step, 10% of a memory-bound step).
// _C.step_direct / _C.roofline_direct take the same arguments as the ops and run the same
// step_bucket / roofline_bucket, reading the tensors straight from their Python objects. They
// return NotImplemented, having done nothing, whenever the dispatcher has work to do: a tensor
// subclass or wrapper (FakeTensor, FunctionalTensor, DTensor), an active TorchDispatchMode, a
// non-CPU param. smes_fused/_ops.py then calls the op instead (and always does while
// torch.compile traces).

const at::Tensor kNone;

bool plain(const at::Tensor& t) {
  static const c10::DispatchKeySet kSpecial({c10::DispatchKey::Python,
                                            c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::Functionalize,
                                            c10::DispatchKey::Conjugate,
                                            c10::DispatchKey::Negative});
  return (t.key_set() & kSpecial).empty();
}

bool Seq::of_python(PyObject* tuple, bool none_ok) {
  const Py_ssize_t n = PyTuple_GET_SIZE(tuple);
  ptrs_.resize((size_t)n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = PyTuple_GET_ITEM(tuple, i);
    if (o == Py_None && none_ok) {
      ptrs_[i] = &kNone;
      continue;
    }
    if (!THPVariable_CheckExact(o)) return false;
    const at::Tensor& t = THPVariable_Unpack(o);
    if (!plain(t)) return false;
    ptrs_[i] = &t;
  }
  return true;
}

// A Python object as an optional tensor argument: nullptr for None; false if it is neither.
bool optional_tensor(PyObject* o, const at::Tensor** out) {
  if (o == Py_None) {
    *out = nullptr;
    return true;
  }
  if (!THPVariable_CheckExact(o) || !plain(THPVariable_Unpack(o))) return false;
  *out = &THPVariable_Unpack(o);
  return true;
}

// The table and scalar arguments of a direct call: false if one is not what the op takes.
bool table_args(PyObject* hy, PyObject* gs, PyObject* fi, const at::Tensor** hypers,
                const at::Tensor** grad_scale, const at::Tensor** found_inf) {
  return optional_tensor(hy, hypers) && *hypers != nullptr && optional_tensor(gs, grad_scale) &&
         optional_tensor(fi, found_inf);
}

// Tuples owning every list entry for the duration of a direct call (the GIL is released while
// it runs, and a caller's list may change meanwhile).
struct TupleArgs {
  std::vector<PyObject*> items;
  ~TupleArgs() {
    for (PyObject* o : items) Py_XDECREF(o);
  }
  // nullptr (with a Python error set) if `seq` is not a sequence.
  PyObject* add(PyObject* seq) {
    PyObject* t = PySequence_Tuple(seq);
    items.push_back(t);
    return t;
  }
};

PyObject* step_direct(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *l[7], *hy, *gs, *fi;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOO:step_direct", &l[kParams], &l[kGrads], &l[kExpAvgs],
                        &l[kExpAvgSqs], &l[kMaxExpAvgSqs], &l[kSteps], &hy, &l[kLrs], &gs, &fi))
    return nullptr;
  if (c10::impl::dispatch_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  TupleArgs owned;
  Seq* s = t_seqs;
  for (int k = 0; k < kNumSeqs; ++k) {
    PyObject* t = owned.add(l[k]);
    if (t == nullptr) return nullptr;
    const bool none_ok = k == kExpAvgSqs || k == kMaxExpAvgSqs || k == kLrs;
    if (!s[k].of_python(t, none_ok)) Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor *hypers, *grad_scale, *found_inf;
  if (!table_args(hy, gs, fi, &hypers, &grad_scale, &found_inf)) Py_RETURN_NOTIMPLEMENTED;
  if (s[kParams].size() != 0 && !(s[kParams][0].defined() && s[kParams][0].device().is_cpu()))
    Py_RETURN_NOTIMPLEMENTED;
  {
    pybind11::gil_scoped_release no_gil;
    step_bucket(s[kParams], s[kGrads], s[kExpAvgs], s[kExpAvgSqs], s[kMaxExpAvgSqs], s[kSteps],
                *hypers, s[kLrs], grad_scale, found_inf);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// first_misfit(params, tensors, dtype=None): the index of the first tensor (None entries
// skipped) whose layout is not strided, whose shape or device differs from its param's, or whose
// dtype differs from its param's (dtype None: gradients) or from `dtype` (a bucket's state); -1 if
// there is none. The optimizer checks every step's grads with it (~20 ns a pair), and every
// bucket's state before it steps any bucket, and lets Python word the error.
PyObject* first_misfit(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *pl, *gl, *dt = Py_None;
  if (!PyArg_ParseTuple(args, "OO|O:first_misfit", &pl, &gl, &dt)) return nullptr;
  if (dt != Py_None && !THPDtype_Check(dt)) {
    PyErr_SetString(PyExc_TypeError, "first_misfit: dtype must be a torch.dtype or None");
    return nullptr;
  }
  const bool own = dt == Py_None;
  const at::ScalarType want = own ? at::ScalarType::Undefined : ((THPDtype*)dt)->scalar_type;
  TupleArgs owned;
  PyObject* ps = owned.add(pl);
  if (ps == nullptr) return nullptr;
  PyObject* gs = owned.add(gl);
  if (gs == nullptr) return nullptr;
  const Py_ssize_t n = PyTuple_GET_SIZE(ps);
  if (PyTuple_GET_SIZE(gs) != n) {
    PyErr_SetString(PyExc_ValueError, "first_misfit: params and tensors differ in length");
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* go = PyTuple_GET_ITEM(gs, i);
    if (go == Py_None) continue;
    PyObject* po = PyTuple_GET_ITEM(ps, i);
    if (!THPVariable_Check(po) || !THPVariable_Check(go)) return PyLong_FromSsize_t(i);
    const at::Tensor& p = THPVariable_Unpack(po);
    const at::Tensor& g = THPVariable_Unpack(go);
    if (g.layout() != at::kStrided || g.scalar_type() != (own ? p.scalar_type() : want) ||
        g.device() != p.device() || g.sym_sizes() != p.sym_sizes())
      return PyLong_FromSsize_t(i);
  }
  return PyLong_FromLong(-1);
  END_HANDLE_TH_ERRORS
}

// first_bad_step(steps): the index of the first step count that is not a one-element floating
// tensor; -1 if there is none (with first_misfit, a bucket's check before any bucket is stepped).
PyObject* first_bad_step(PyObject*, PyObject* arg) {
  HANDLE_TH_ERRORS
  TupleArgs owned;
  PyObject* ss = owned.add(arg);
  if (ss == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(ss); ++i) {
    PyObject* so = PyTuple_GET_ITEM(ss, i);
    if (!THPVariable_Check(so)) return PyLong_FromSsize_t(i);
    const at::Tensor& t = THPVariable_Unpack(so);
    if (t.sym_numel() != 1 || !at::isFloatingType(t.scalar_type())) return PyLong_FromSsize_t(i);
  }
  return PyLong_FromLong(-1);
  END_HANDLE_TH_ERRORS
}

// state_matches(state, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps): whether
// state[params[i]] is still a dict holding exactly these tensor objects under torch's names (the
// optional lists are empty or full). The optimizer's cached plan holds its state tensors between
// steps; this tells it, ~100 ns a param, whether someone replaced them by hand since (torch's
// optimizers read the state every step, so such an edit must take effect).
PyObject* state_matches(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *state, *l[5];
  if (!PyArg_ParseTuple(args, "OOOOOO:state_matches", &state, &l[0], &l[1], &l[2], &l[3], &l[4]))
    return nullptr;
  if (!PyDict_Check(state)) Py_RETURN_FALSE;
  static PyObject* names[4] = {PyUnicode_InternFromString("exp_avg"),
                               PyUnicode_InternFromString("exp_avg_sq"),
                               PyUnicode_InternFromString("max_exp_avg_sq"),
                               PyUnicode_InternFromString("step")};
  PyObject* fast[5] = {};
  struct Release {
    PyObject** f;
    ~Release() {
      for (int k = 0; k < 5; ++k) Py_XDECREF(f[k]);
    }
  } release{fast};
  for (int k = 0; k < 5; ++k) {
    fast[k] = PySequence_Fast(l[k], "state_matches takes sequences");
    if (fast[k] == nullptr) return nullptr;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast[0]);
  // torch.Tensor.__hash__ is id(self), a Python-level method (~100 ns a call): where this
  // CPython exports the lookup with a known hash and the first param confirms hash == address,
  // look the params up by address, without calling it.
  bool known_hash = false;
#if PY_VERSION_HEX < 0x030D0000
  if (n > 0) {
    PyObject* p0 = PySequence_Fast_GET_ITEM(fast[0], 0);
    const Py_hash_t h = PyObject_Hash(p0);
    if (h == -1) return nullptr;
    known_hash = h == (Py_hash_t)(intptr_t)p0;
  }
#endif
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* key = PySequence_Fast_GET_ITEM(fast[0], i);
    PyObject* d;
#if PY_VERSION_HEX < 0x030D0000
    if (known_hash)
      d = _PyDict_GetItem_KnownHash(state, key, (Py_hash_t)(intptr_t)key);
    else
#endif
      d = PyDict_GetItemWithError(state, key);
    if (d == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_FALSE;
    }
    if (!PyDict_Check(d)) Py_RETURN_FALSE;
    for (int k = 0; k < 4; ++k) {
      PyObject* want = PySequence_Fast_GET_SIZE(fast[k + 1]) == 0
                           ? nullptr
                           : PySequence_Fast_GET_ITEM(fast[k + 1], i);
      PyObject* have = PyDict_GetItemWithError(d, names[k]);
      if (have == nullptr && PyErr_Occurred()) return nullptr;
      const bool ok = (want != nullptr && want != Py_None) ? have == want
                                                           : (have == nullptr || have == Py_None);
      if (!ok) Py_RETURN_FALSE;
    }
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyObject* roofline_direct(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* l[4];
  if (!PyArg_ParseTuple(args, "OOOO:roofline_direct", &l[0], &l[1], &l[2], &l[3]))
    return nullptr;
  if (c10::impl::dispatch_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  TupleArgs owned;
  Seq* s = t_seqs;
  for (int k = 0; k < 4; ++k) {
    PyObject* t = owned.add(l[k]);
    if (t == nullptr) return nullptr;
    if (!s[k].of_python(t, false)) Py_RETURN_NOTIMPLEMENTED;
  }
  {
    pybind11::gil_scoped_release no_gil;
    roofline_bucket(s[0], s[1], s[2], s[3]);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// ------------------------------------------------------------------ a bucket kept in C++
//
// The "cpu" backend's steady state (smes_fused/backends/compiled.py, FastBucket): a bucket's
// params and state tensors held here between steps, so that a step passes only the
// hyperparameter table and reads each param's .grad itself: no per-tensor Python at all.
// _C.plan_step returns NotImplemented, having done nothing, whenever a grad is missing, not
// strided or not a plain tensor, or a dispatch mode is active; the optimizer then takes its
// general path, which validates everything and says what is wrong.

struct Plan {
  std::vector<at::Tensor> lists[5];  // params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps
};
constexpr const char* kPlanName = "smes_fused.Plan";

void plan_free(PyObject* capsule) {
  delete static_cast<Plan*>(PyCapsule_GetPointer(capsule, kPlanName));
}

// plan_new(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps): a capsule, or NotImplemented
// if an entry is not a plain tensor (the optional lists are empty or full, as for the op).
PyObject* plan_new(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* l[5];
  if (!PyArg_ParseTuple(args, "OOOOO:plan_new", &l[0], &l[1], &l[2], &l[3], &l[4])) return nullptr;
  auto plan = std::make_unique<Plan>();
  TupleArgs owned;
  Seq seq;
  for (int k = 0; k < 5; ++k) {
    PyObject* t = owned.add(l[k]);
    if (t == nullptr) return nullptr;
    if (!seq.of_python(t, false)) Py_RETURN_NOTIMPLEMENTED;
    for (size_t i = 0; i < seq.size(); ++i) plan->lists[k].push_back(seq[i]);
  }
  PyObject* capsule = PyCapsule_New(plan.get(), kPlanName, plan_free);
  if (capsule != nullptr) plan.release();
  return capsule;
  END_HANDLE_TH_ERRORS
}

thread_local std::vector<at::Tensor> t_grads;

// plan_step(plan, hypers, grad_scale, found_inf): smes_step_ on the plan's tensors and their
// current grads; None, or NotImplemented (nothing done) as said above.
PyObject* plan_step(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *capsule, *hy, *gs, *fi;
  if (!PyArg_ParseTuple(args, "OOOO:plan_step", &capsule, &hy, &gs, &fi)) return nullptr;
  auto* plan = static_cast<Plan*>(PyCapsule_GetPointer(capsule, kPlanName));
  if (plan == nullptr) return nullptr;
  if (c10::impl::dispatch_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  const at::Tensor *hypers, *grad_scale, *found_inf;
  if (!table_args(hy, gs, fi, &hypers, &grad_scale, &found_inf)) Py_RETURN_NOTIMPLEMENTED;
  const std::vector<at::Tensor>& params = plan->lists[0];
  struct Release {  // the grads' references end with the call
    ~Release() { t_grads.clear(); }
  } release;
  t_grads.resize(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = p.grad();
    // A grad that does not fit its param: the general path says what is wrong (SPEC §5).
    if (!g.defined() || g.layout() != at::kStrided || !plain(g) ||
        g.scalar_type() != p.scalar_type() || g.device() != p.device() || g.sizes() != p.sizes())
      Py_RETURN_NOTIMPLEMENTED;
    t_grads[i] = g;
  }
  Seq* s = t_seqs;
  s[kParams].of(params);
  s[kGrads].of(t_grads);
  s[kExpAvgs].of(plan->lists[1]);
  s[kExpAvgSqs].of(plan->lists[2]);
  s[kMaxExpAvgSqs].of(plan->lists[3]);
  s[kSteps].of(plan->lists[4]);
  s[kLrs].of(at::TensorList());
  {
    pybind11::gil_scoped_release no_gil;
    step_bucket(s[kParams], s[kGrads], s[kExpAvgs], s[kExpAvgSqs], s[kMaxExpAvgSqs], s[kSteps],
                *hypers, s[kLrs], grad_scale, found_inf);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

}  // namespace
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
  HANDLE_TH_ERRORS
  return PyUnicode_FromString(smes::cpu::pick_kernels().isa);
  END_HANDLE_TH_ERRORS
}
// sr_noise_lanes of the kernel set in use: a list of 3 W noise values (tests only)
static PyObject* smes_sr_noise_lanes(PyObject*, PyObject* args) {
  unsigned int key;
  long long index;
  if (!PyArg_ParseTuple(args, "IL", &key, &index)) return nullptr;
  uint32_t out[48];
  HANDLE_TH_ERRORS
  const int n = smes::cpu::pick_kernels().sr_noise_lanes(key, index, out);
  PyObject* list = PyList_New(n);
  for (int i = 0; i < n; ++i) PyList_SET_ITEM(list, i, PyLong_FromUnsignedLong(out[i]));
  return list;
  END_HANDLE_TH_ERRORS
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
    {"sr_noise_lanes", smes_sr_noise_lanes, METH_VARARGS,
     "Stochastic rounding noise of a vector's and a pair's lanes at an element index (tests)."},
    {"step_direct", smes::cpu::step_direct, METH_VARARGS,
     "smes_step_ on plain CPU tensors without the dispatcher; NotImplemented when it cannot."},
    {"first_misfit", smes::cpu::first_misfit, METH_VARARGS,
     "Index of the first grad or state tensor that does not fit its param."},
    {"first_bad_step", smes::cpu::first_bad_step, METH_O,
     "Index of the first step count that is not a one-element floating tensor."},
    {"state_matches", smes::cpu::state_matches, METH_VARARGS,
     "Whether optimizer state still holds exactly the given tensor objects."},
    {"plan_new", smes::cpu::plan_new, METH_VARARGS,
     "A bucket's params and state kept in C++ (a capsule); NotImplemented when it cannot."},
    {"plan_step", smes::cpu::plan_step, METH_VARARGS,
     "smes_step_ on a plan and its params' current grads; NotImplemented when it cannot."},
    {"roofline_direct", smes::cpu::roofline_direct, METH_VARARGS,
     "roofline_ on plain CPU tensors without the dispatcher; NotImplemented when it cannot."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef smes_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, smes_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&smes_module); }
