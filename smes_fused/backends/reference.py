"""``"reference"``: SPEC §1 written once per tensor in plain PyTorch, to be read.

This is the executable form of the rule; every other backend is tested against it and against a
float64 evaluation in the tests. It favours clarity over speed, and syncs with the host for
``found_inf`` (the fused backends do not).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._bucket import (
    P_HALF,
    P_ZERO,
    Bucket,
    BucketKey,
    Hyper,
    compute_dtype,
    traced_scalar,
    unfit_state_dtype,
)
from .._rounding import round_to_bf16, tensor_key
from . import register


def _value(t: Tensor):
    """A host step count as a Python float; a device one stays a tensor (capturable)."""
    return t.item() if t.device.type == "cpu" else t.double()


def rectification(h: Hyper, t):
    """RAdam's (adaptive, r_t) at step ``t`` (SPEC §4): while ρ_t ≤ 5 the step is the momentum
    step u = m̂ (not adaptive); after that the adaptive step is multiplied by r_t. (True, 1) without
    ``rectify``. ``t`` is a float, or a float64 tensor (then so are both results)."""
    if not h.rectify:
        return True, 1.0
    rho_inf = 2 / (1 - h.beta2) - 1
    b2t = h.beta2**t
    rho_t = rho_inf - 2 * t * b2t / (1 - b2t)

    def r_of(rho):
        return (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)

    if isinstance(rho_t, Tensor):
        adaptive = rho_t > 5
        r = r_of(torch.where(adaptive, rho_t, torch.full_like(rho_t, 6.0))).sqrt()
        return adaptive, torch.where(adaptive, r, torch.ones_like(r))
    if rho_t <= 5:
        return False, 1.0
    return True, math.sqrt(r_of(rho_t))


def rectified_eps(h: Hyper, bc2):
    """The eps of a rectified adaptive step (SPEC §4): torch's RAdam adds eps before the bias
    correction, D = (v^p + eps)/bc2^p = v̂^p + eps/bc2^p. ``bc2`` a float or a float64 tensor."""
    return h.eps / bc2 ** traced_scalar(h.exponent)


def power_hat(v: Tensor, bc2, p: float) -> Tensor:
    """(v / bc2)^p in v's dtype. On CPU it is evaluated in float64 and rounded once: torch's
    float32 pow on CPU rounds a vector's lanes and a loop tail's elements differently (Sleef and
    scalar code; seen with AVX-512), so an element's result depended on where its tensor (an
    FSDP2 shard, one of a group) began. Elsewhere (one thread per element) float32 as it is.
    Under torch.compile p enters as a tensor (traced_scalar: an exponent schedule)."""
    p = traced_scalar(p, v.device)
    if v.device.type != "cpu":
        return (v / bc2) ** p
    return ((v.double() / bc2) ** p).to(v.dtype)


def project(theta: Tensor, g: Tensor, u: Tensor, delta: float, eps: float) -> tuple[Tensor, bool]:
    """AdamP/SGDP's projection (SPEC §4), as clovaai's adamp writes it: per output channel, then
    per layer, if the gradient is nearly orthogonal to the weight (max |cos| < delta/sqrt(row
    length)), remove the radial component of the update ``u``. Returns (u, projected)."""
    if theta.dim() <= 1 or theta.numel() == 0:
        return u, False
    expand = [-1] + [1] * (theta.dim() - 1)
    for view in (lambda x: x.reshape(x.size(0), -1), lambda x: x.reshape(1, -1)):
        cos = F.cosine_similarity(view(g), view(theta), dim=1, eps=eps).abs()
        if cos.max() < delta / math.sqrt(view(theta).size(1)):
            unit = theta / view(theta).norm(dim=1).view(expand).add(eps)
            return u - unit * view(unit * u).sum(dim=1).view(expand), True
    return u, False


def smes_tensor(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor | None,
    max_exp_avg_sq: Tensor | None,
    step: Tensor,
    h: Hyper,
    grad_scale: Tensor | None = None,
    salt: int = 0,
) -> None:
    """One SMES step of one tensor; ``step`` already holds this step's count; ``salt``: of its
    rounding seed (``Bucket.salts``)."""
    cd = compute_dtype(param.dtype)
    theta = param.to(cd)
    g = grad.to(cd)
    m = exp_avg.to(cd)
    lr = h.lr.to(param.device, cd) if isinstance(h.lr, Tensor) else h.lr

    if h.maximize:
        g = -g
    if grad_scale is not None:
        g = g * grad_scale.to(cd).reciprocal()
    g_proj = g  # projection's cosine uses the gradient before L2 (SPEC §4)
    if h.weight_decay != 0 and not h.decoupled:
        g = g + h.weight_decay * theta

    m = h.beta1 * m + (1 - h.beta1) * g
    exp_avg.copy_(m)

    v = None
    if h.track_v:
        v = exp_avg_sq.to(cd)
        if h.second_moment_sum:  # AdaGrad
            v = v + g * g
        else:
            v = h.beta2 * v + (1 - h.beta2) * g * g
        exp_avg_sq.copy_(v)
        if h.amsgrad:
            v = v.maximum(max_exp_avg_sq.to(cd))
            max_exp_avg_sq.copy_(v)

    t = _value(step)
    bc1, bc2 = (1 - h.beta1**t, 1 - h.beta2**t) if h.bias_correction else (1.0, 1.0)
    if h.second_moment_sum:
        bc2 = 1.0
    adaptive, r = rectification(h, t)

    p_class = h.variant.p_class
    rect = h.rectify and p_class != P_ZERO
    eps = rectified_eps(h, bc2) if rect else h.eps
    if p_class == P_ZERO:
        denom = 1 + h.eps
    elif p_class == P_HALF:
        denom = v.sqrt() / bc2**0.5 + eps
    else:
        denom = power_hat(v, bc2, h.exponent) + eps  # v = 0, p < 0: inf, so the update is 0
    u = m / denom
    if rect:
        u = torch.where(torch.as_tensor(adaptive, device=u.device), u * r, m)

    decay = 1.0
    if h.weight_decay != 0 and h.decoupled:
        decay = 1 - lr * h.weight_decay
    if h.projection:
        u, projected = project(theta, g_proj, u, h.projection_delta, h.eps)
        if projected and h.weight_decay != 0 and h.decoupled:
            decay = 1 - lr * h.weight_decay * h.projection_wd_ratio

    theta = theta * decay - (lr / bc1) * u
    if h.stochastic_rounding and param.dtype == torch.bfloat16:
        theta = round_to_bf16(theta, tensor_key(h.rounding_seed ^ salt, t), like=param)
    param.copy_(theta)


class ReferenceBackend:
    name = "reference"
    steps_on_device = False

    def unavailable(self) -> str | None:
        return None

    def cannot_run(self, key: BucketKey) -> str | None:
        return unfit_state_dtype(key)

    def __call__(self, bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
        # (functional.apply checked the bucket's state before stepping any bucket)
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
                bucket.salts[i],
            )


register(ReferenceBackend())
