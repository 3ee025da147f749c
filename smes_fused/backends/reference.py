"""``"reference"``: SPEC §1 written once per tensor in plain PyTorch, to be read.

This is the executable form of the rule; every other backend is tested against it and against a
float64 evaluation in the tests. It favours clarity over speed, and syncs with the host for
``found_inf`` (the fused backends do not).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._bucket import P_HALF, P_ZERO, Bucket, BucketKey, Hyper, compute_dtype
from . import register


def _value(t: Tensor):
    """A host step count as a Python float; a device one stays a tensor (capturable)."""
    return t.item() if t.device.type == "cpu" else t.double()


def smes_tensor(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor | None,
    max_exp_avg_sq: Tensor | None,
    step: Tensor,
    h: Hyper,
    grad_scale: Tensor | None = None,
) -> None:
    """One SMES step of one tensor; ``step`` already holds this step's count."""
    cd = compute_dtype(param.dtype)
    theta = param.to(cd)
    g = grad.to(cd)
    m = exp_avg.to(cd)
    lr = h.lr.to(param.device, cd) if isinstance(h.lr, Tensor) else h.lr

    if h.maximize:
        g = -g
    if grad_scale is not None:
        g = g * grad_scale.to(cd).reciprocal()
    if h.weight_decay != 0:
        if h.decoupled:
            theta = theta * (1 - lr * h.weight_decay)
        else:
            g = g + h.weight_decay * theta

    m = h.beta1 * m + (1 - h.beta1) * g
    exp_avg.copy_(m)

    v = None
    if h.track_v:
        v = exp_avg_sq.to(cd)
        v = h.beta2 * v + (1 - h.beta2) * g * g
        exp_avg_sq.copy_(v)
        if h.amsgrad:
            v = v.maximum(max_exp_avg_sq.to(cd))
            max_exp_avg_sq.copy_(v)

    t = _value(step)
    bc1, bc2 = (1 - h.beta1**t, 1 - h.beta2**t) if h.bias_correction else (1.0, 1.0)

    p_class = h.variant.p_class
    if p_class == P_ZERO:
        denom = 1 + h.eps
    elif p_class == P_HALF:
        denom = v.sqrt() / bc2**0.5 + h.eps
    else:
        denom = (v / bc2) ** h.exponent + h.eps  # v = 0, p < 0: inf, so the update is 0

    theta = theta - (lr / bc1) * (m / denom)
    param.copy_(theta)


class ReferenceBackend:
    name = "reference"
    steps_on_device = False

    def unavailable(self) -> str | None:
        return None

    def cannot_run(self, key: BucketKey) -> str | None:
        return None

    def __call__(self, bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
        if found_inf is not None and found_inf.item() != 0:
            return
        torch._foreach_add_(bucket.steps, 1)
        for i in range(len(bucket)):
            smes_tensor(
                bucket.params[i],
                bucket.grads[i],
                bucket.exp_avgs[i],
                bucket.exp_avg_sqs[i],
                bucket.max_exp_avg_sqs[i],
                bucket.steps[i],
                bucket.hypers[i],
                grad_scale,
            )


register(ReferenceBackend())
