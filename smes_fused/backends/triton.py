"""``"triton"``: the multi-tensor SMES Triton kernel, the default on CUDA devices.

One launch per step applies the rule to every tensor of a bucket, across all param groups (one
launch per compile-time variant present, usually one). The kernel and its table cache live in
``smes_fused.triton_kernels.smes`` (the top-level folder ``triton_kernels/``, installed under
``smes_fused`` so it never clashes with other distributions' ``triton_kernels``).

CPU buckets run only under ``TRITON_INTERPRET=1`` (Triton's interpreter executes the same kernel
on CPU tensors, which is how CI tests it); otherwise this backend is for CUDA tensors.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from .._bucket import Bucket, BucketKey, steps_advanced
from . import register

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNELS = "smes_fused.triton_kernels.smes"


def _interpret() -> bool:
    """Whether Triton's interpreter is in effect (TRITON_INTERPRET=1 or the knob)."""
    from triton import knobs

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

        with steps_advanced(bucket.steps, found_inf):
            for variant, index in bucket.by_variant().items():
                sub = bucket if len(index) == len(bucket) else bucket.subset(index)
                _k.smes_step(
                    sub.params,
                    sub.grads,
                    sub.exp_avgs,
                    sub.exp_avg_sqs,
                    sub.max_exp_avg_sqs,
                    sub.steps,
                    sub.hypers,
                    variant,
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                )


register(TritonBackend())
