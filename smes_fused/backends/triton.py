"""``"triton"``: the multi-tensor SMES Triton kernel, the default on CUDA devices.

Two launches per step apply the rule to every tensor of a bucket, across all param groups (per
compile-time variant present, usually one): a per-tensor prologue that advances the step counts
(not under ``found_inf``) and computes the float64 bias corrections once, and the element kernel.
The kernels and their table cache live in ``smes_fused.triton_kernels`` (the top-level folder
``triton_kernels/``, installed under ``smes_fused`` so it never clashes with other distributions'
``triton_kernels``). Under torch.compile the step is the registered op
``torch.ops.smes_fused.triton_step_`` (no graph break).

CPU buckets run only under ``TRITON_INTERPRET=1`` (Triton's interpreter executes the same kernel
on CPU tensors, which is how CI tests it); otherwise this backend is for CUDA tensors.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from .._bucket import Bucket, BucketKey
from . import get, register

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNELS = "smes_fused.triton_kernels.smes"
_MIN_TRITON = (3, 0)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _interpret() -> bool:
    """Whether Triton's interpreter is in effect (the knob; before Triton 3.4, which has no
    ``triton.knobs``, the environment variable that Triton itself reads)."""
    try:
        from triton import knobs
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return bool(knobs.runtime.interpret)


def _kernels_mode() -> bool | None:
    """The mode the kernels were created in (True: interpreter), None if not imported yet."""
    mod = sys.modules.get(_KERNELS)
    return None if mod is None else mod.INTERPRET


def _interpreting() -> bool:
    """Whether the kernels run under the interpreter: their mode is fixed when they are first
    imported; before that, the knob decides."""
    loaded = _kernels_mode()
    return _interpret() if loaded is None else loaded


class TritonBackend:
    name = "triton"
    steps_on_device = True

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed: pip install triton (or smes-fused[triton])"
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as e:  # a broken install
            return f"Triton failed to import: {type(e).__name__}: {e}"
        if not torch.cuda.is_available() and not _interpreting():
            return (
                "no CUDA device is visible (torch.cuda.is_available() is False): the Triton "
                "kernel runs on CUDA GPUs (on CPU only under Triton's interpreter, "
                "TRITON_INTERPRET=1, which is meant for tests)"
            )
        version = getattr(triton, "__version__", "0")
        if _version_tuple(version) < _MIN_TRITON:
            return (
                f"Triton {version} is older than {'.'.join(map(str, _MIN_TRITON))}, the oldest "
                "the kernels are written for: pip install -U triton"
            )
        try:  # once: an import inside a compiled step would break its graph
            if _KERNELS not in sys.modules:
                importlib.import_module(_KERNELS)
        except Exception as e:  # an API this Triton lacks
            return f"the Triton kernels failed to load: {type(e).__name__}: {e}"
        return None

    def cannot_run(self, key: BucketKey) -> str | None:
        if key.param_dtype not in _PARAM_DTYPES:
            return f"params of {key.param_dtype} (supported: float32, bfloat16, float16)"
        if key.state_dtype not in (torch.float32, key.param_dtype):
            return f"state of {key.state_dtype} (supported: float32 or the params' dtype)"
        interp = _interpreting()
        if key.device.type == "cuda":
            if interp:
                return (
                    "TRITON_INTERPRET=1 is in effect (the interpreter runs CPU tensors only); "
                    "unset it to run the compiled kernel on CUDA"
                )
            return None
        if key.device.type == "cpu":
            if not interp:
                return (
                    "the Triton kernel runs on CUDA devices; on CPU only under Triton's "
                    "interpreter (TRITON_INTERPRET=1 set before the first step), which is slow "
                    "and meant for tests: use backend='cpu' or 'foreach'"
                )
            return None
        return f"device type {key.device.type!r} (supported: cuda; cpu under TRITON_INTERPRET=1)"

    def __call__(self, bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
        from ..triton_kernels import smes as _k

        # The kernels advance the step counts themselves (and not under found_inf).
        for variant, index in bucket.by_variant().items():
            sub = bucket if len(index) == len(bucket) else bucket.subset(index)
            if torch.compiler.is_compiling():
                _traced_step(sub, variant, grad_scale, found_inf)
                continue
            try:
                self._launch(_k, sub, variant, grad_scale, found_inf)
            except _k.smes_checks.LayoutError:
                # Checked before anything was written: the tensors the kernel cannot walk (a
                # non-contiguous param, a grad laid out unlike its param) go per tensor.
                self._split(_k, sub, variant, grad_scale, found_inf)

    @staticmethod
    def _launch(_k, b: Bucket, variant, grad_scale, found_inf) -> None:
        _k.smes_step(
            b.params,
            b.grads,
            b.exp_avgs,
            b.exp_avg_sqs,
            b.max_exp_avg_sqs,
            b.steps,
            b.hypers,
            variant,
            salts=b.salts,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )

    def _split(self, _k, b: Bucket, variant, grad_scale, found_inf) -> None:
        proj = getattr(variant, "projection", False)
        ok = [
            _k.smes_checks.walkable(*t, projection=proj)
            for t in zip(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs)
        ]
        fast = [i for i, x in enumerate(ok) if x]
        slow = [i for i, x in enumerate(ok) if not x]
        if fast:
            self._launch(_k, b.subset(fast), variant, grad_scale, found_inf)
        get("reference")(b.subset(slow), grad_scale=grad_scale, found_inf=found_inf)


def _traced_step(bucket: Bucket, variant, grad_scale, found_inf) -> None:
    """The step as ``torch.ops.smes_fused.triton_step_``, for torch.compile's graph."""
    from ..triton_kernels import smes_op
    from ..triton_kernels.smes import group_of

    groups, index = group_of(bucket.hypers, bucket.salts)
    values, lr_tensors = smes_op.flatten_groups(groups)
    smes_op.triton_step_(
        bucket.params,
        bucket.grads,
        bucket.exp_avgs,
        bucket.exp_avg_sqs if variant.track_v else [],
        bucket.max_exp_avg_sqs if variant.amsgrad else [],
        bucket.steps,
        values,
        lr_tensors,
        index,
        [int(variant.p_class), *(int(x) for x in variant[1:])],
        grad_scale,
        found_inf,
    )


register(TritonBackend())
