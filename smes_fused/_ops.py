"""The compiled ops of ``smes_fused._C`` (csrc/), loaded when present.

Importing this module never fails: ``HAVE_C`` says whether the extension loaded, and
``unavailable_reason()`` says why not and how to build it. The ops are

- ``torch.ops.smes_fused.smes_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
  steps, hypers, lrs, grad_scale=None, found_inf=None)``: one SMES step of a whole bucket
  (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs mutated in place, and the step counts
  advanced by one unless found_inf is non-zero);
- ``torch.ops.smes_fused.roofline_(params, grads, exp_avgs, exp_avg_sqs)``: the same memory
  traffic with trivial math, the CPU memory roofline of the benchmark suite (see :func:`roofline`).

In eager mode, :func:`smes_step_` and :func:`roofline` call the same C++ code through
``_C.step_direct`` / ``_C.roofline_direct``, which read plain CPU tensors straight from their
Python objects rather than through the dispatcher's per-entry argument conversion (~120 ns per
list entry); they fall back to the op for anything the dispatcher must see (tensor subclasses,
dispatch modes, CUDA tensors) and while torch.compile traces.

``hypers`` is a contiguous float64 CPU tensor of shape ``[n, 10]``; its columns are
:data:`HYPER_COLUMNS`, the last one the bit flags ``FLAG_*``.
"""

from __future__ import annotations

import torch
from torch import Tensor

BUILD_COMMAND = "pip install --no-build-isolation -e ."

HYPER_COLUMNS = ("lr", "beta1", "beta2", "eps", "exponent", "weight_decay", "flags",
                 "projection_delta", "projection_wd_ratio", "rounding_seed")  # fmt: skip
FLAG_BIAS_CORRECTION = 1
FLAG_DECOUPLED = 2
FLAG_AMSGRAD = 4
FLAG_MAXIMIZE = 8
FLAG_TRACK_V = 16
FLAG_RECTIFY = 32
FLAG_SUM_V = 64
FLAG_PROJECTION = 128
FLAG_SR = 256

try:
    from . import _C  # noqa: F401  (registers torch.ops.smes_fused.*)

    HAVE_C = True
    _IMPORT_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    HAVE_C = False
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def unavailable_reason() -> str | None:
    """None when the compiled ops are loaded, else why not and the build command."""
    if HAVE_C:
        return None
    return (
        f"the compiled extension smes_fused._C is not available ({_IMPORT_ERROR}); build it "
        f"from the source tree with `{BUILD_COMMAND}` (needs a C++ compiler, ninja and torch; "
        "for the CUDA kernels also nvcc and a CUDA build of torch)"
    )


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return HAVE_C and bool(_C.has_cuda())


def cpu_isa() -> str | None:
    """The CPU kernel set in use ("avx512", "avx2" or "base"; env SMES_CPU_ISA caps it)."""
    return _C.cpu_isa() if HAVE_C else None


if HAVE_C:

    @torch.library.register_fake("smes_fused::smes_step_")
    def _smes_step_fake(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hypers, lrs,
        grad_scale=None, found_inf=None,
    ) -> None:  # fmt: skip
        return None

    @torch.library.register_fake("smes_fused::roofline_")
    def _roofline_fake(params, grads, exp_avgs, exp_avg_sqs) -> None:
        return None


def first_misfit(
    params: list[Tensor], tensors: list[Tensor | None], dtype: torch.dtype | None = None
) -> int | None:
    """The index of the first tensor (None entries skipped) that is not strided, whose shape or
    device differs from its param's, or whose dtype differs from its param's (``dtype`` None: a
    gradient) or from ``dtype`` (a bucket's state); None if every one fits. In C++ when the
    extension is loaded (~20 ns a pair), in Python otherwise and while torch.compile traces
    (where the comparisons are resolved at trace time)."""
    if HAVE_C and not torch.compiler.is_compiling():
        i = _C.first_misfit(params, tensors, dtype)
        return None if i < 0 else i
    for i, (p, t) in enumerate(zip(params, tensors, strict=True)):
        if t is not None and (
            t.layout is not torch.strided
            or t.dtype != (p.dtype if dtype is None else dtype)
            or t.device != p.device
            or t.shape != p.shape
        ):
            return i
    return None


def first_bad_step(steps: list[Tensor]) -> int | None:
    """The index of the first step count that is not a one-element floating tensor, or None."""
    if HAVE_C and not torch.compiler.is_compiling():
        i = _C.first_bad_step(steps)
        return None if i < 0 else i
    for i, s in enumerate(steps):
        if not isinstance(s, Tensor) or s.numel() != 1 or not s.is_floating_point():
            return i
    return None


_STATE_NAMES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")


def state_matches(state: dict, params: list, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps) -> bool:
    """Whether ``state[params[i]]`` still holds exactly these tensor objects (None: absent).
    In C++ when the extension is loaded (~100 ns a param)."""
    if HAVE_C and not torch.compiler.is_compiling():
        return _C.state_matches(state, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    lists = (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    for i, p in enumerate(params):
        d = state.get(p)
        if not isinstance(d, dict):
            return False
        for name, ts in zip(_STATE_NAMES, lists):
            want = ts[i] if len(ts) else None
            if d.get(name) is not want:
                return False
    return True


def smes_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor | None],
    max_exp_avg_sqs: list[Tensor | None],
    steps: list[Tensor],
    hypers: Tensor,
    lrs: list[Tensor | None],
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    if not torch.compiler.is_compiling():
        done = _C.step_direct(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hypers, lrs,
            grad_scale, found_inf,
        )  # fmt: skip
        if done is not NotImplemented:
            return
    torch.ops.smes_fused.smes_step_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hypers, lrs,
        grad_scale, found_inf,
    )  # fmt: skip


def roofline(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor]
) -> None:
    """The SMES step's memory traffic (read θ, g, m, v; write θ, m, v: 28 B per float32
    element) with trivial math and the same parallel split as the CPU kernel.

    Time it to get the memory roofline of the optimizer on this machine. Float32, contiguous,
    CPU tensors; θ changes by a negligible 1e-30·g, m grows by g and v by g² (so v stays a valid
    second moment: the benchmark shares state buffers between competitors).
    """
    if not HAVE_C:
        raise RuntimeError(unavailable_reason())
    if torch.compiler.is_compiling() or (
        _C.roofline_direct(params, grads, exp_avgs, exp_avg_sqs) is NotImplemented
    ):
        torch.ops.smes_fused.roofline_(params, grads, exp_avgs, exp_avg_sqs)
