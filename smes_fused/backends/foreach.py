"""``"foreach"``: SPEC §1 with ``torch._foreach_*`` ops, one call per op per param group.

Runs anywhere torch runs (any device, any float dtype). 16-bit params are computed in float32 and
written back. Step counts on the host give Python-float bias corrections (torch's foreach AdamW
order); step counts on the device (``capturable``) or a tensor lr keep everything on the device.
``found_inf`` is read with a host sync here; the fused backends avoid it.
"""

from __future__ import annotations

import math

import torch
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
from .reference import power_hat, rectification, rectified_eps


def _cast(ts: list[Tensor], dtype: torch.dtype) -> tuple[list[Tensor], bool]:
    if all(t.dtype == dtype for t in ts):
        return ts, False
    return [t.to(dtype) for t in ts], True


def _group_step(b: Bucket, h: Hyper, grad_scale: Tensor | None) -> None:
    cd = compute_dtype(b.key.param_dtype)
    theta, theta_cast = _cast(b.params, cd)
    g, _ = _cast(b.grads, cd)
    m, m_cast = _cast(b.exp_avgs, cd)
    # Under torch.compile too: host step counts read with .item() would specialise the graph on
    # every step's count (a recompile per step).
    compiling = torch.compiler.is_compiling()
    on_device = isinstance(h.lr, Tensor) or b.steps[0].device.type != "cpu" or compiling
    # A float lr under torch.compile enters as a tensor (traced_scalar: an lr schedule).
    lr = h.lr if isinstance(h.lr, Tensor) else traced_scalar(h.lr, b.params[0].device)

    if h.maximize:
        g = torch._foreach_neg(g)
    if grad_scale is not None:
        g = torch._foreach_mul(g, grad_scale.to(cd).reciprocal())
    extended = h.projection or h.rectify  # SPEC §4: the update direction is computed first
    g_cos = g
    if h.weight_decay != 0:
        if h.decoupled:
            if not extended:
                torch._foreach_mul_(theta, 1 - lr * h.weight_decay)
        else:
            g = torch._foreach_add(g, theta, alpha=h.weight_decay)
    torch._foreach_lerp_(m, g, 1 - h.beta1)

    vv = None
    if h.track_v:
        v, v_cast = _cast(b.exp_avg_sqs, cd)
        if h.second_moment_sum:  # AdaGrad
            torch._foreach_addcmul_(v, g, g)
        else:
            torch._foreach_mul_(v, h.beta2)
            torch._foreach_addcmul_(v, g, g, 1 - h.beta2)
        if v_cast:
            torch._foreach_copy_(b.exp_avg_sqs, v)
        vv = v
        if h.amsgrad:
            vmax, vmax_cast = _cast(b.max_exp_avg_sqs, cd)
            torch._foreach_maximum_(vmax, v)
            if vmax_cast:
                torch._foreach_copy_(b.max_exp_avg_sqs, vmax)
            vv = vmax

    # Bias corrections and step sizes: float64 Python numbers, or float64 device scalars.
    if on_device:
        t = [s.to(torch.float64) for s in b.steps]
        if isinstance(lr, Tensor):
            lr = lr.to(b.params[0].device, torch.float64)
    else:
        t = [s.item() for s in b.steps]
    if h.bias_correction:
        bc1 = [1 - h.beta1**ti for ti in t]
        bc2 = [1 - h.beta2**ti for ti in t]
    else:
        bc1 = bc2 = [1.0] * len(t)
    if h.second_moment_sum:
        bc2 = [1.0] * len(t)
    if extended:
        _extended_update(b, h, theta, g_cos, m, vv, t, bc1, bc2, lr, cd)
        if m_cast:
            torch._foreach_copy_(b.exp_avgs, m)
        if theta_cast:
            _write_params(b, h, theta, t)
        return
    neg_step = [-(lr / x) for x in bc1]
    if on_device:
        neg_step = [
            x.to(cd)
            if isinstance(x, Tensor)
            else torch.tensor(x, dtype=cd, device=b.params[0].device)
            for x in neg_step
        ]
        bc2 = [x.to(cd) if isinstance(x, Tensor) else x for x in bc2]

    p_class = h.variant.p_class
    if p_class == P_ZERO:
        d = torch._foreach_div(m, 1 + h.eps)
        torch._foreach_mul_(d, neg_step)
        torch._foreach_add_(theta, d)
    else:
        if p_class == P_HALF:
            d = torch._foreach_sqrt(vv)
            torch._foreach_div_(d, [x**0.5 for x in bc2])
        else:
            d = [power_hat(x, c, h.exponent) for x, c in zip(vv, bc2)]  # v = 0, p < 0: inf
        torch._foreach_add_(d, h.eps)
        if on_device:
            torch._foreach_div_(d, neg_step)
            torch._foreach_addcdiv_(theta, m, d)
        else:
            torch._foreach_addcdiv_(theta, m, d, neg_step)

    if m_cast:
        torch._foreach_copy_(b.exp_avgs, m)
    if theta_cast:
        _write_params(b, h, theta, t)


def _write_params(b: Bucket, h: Hyper, theta, t) -> None:
    """The new θ into 16-bit params: to nearest, or stochastically for bf16 (SPEC §4)."""
    if not (h.stochastic_rounding and b.key.param_dtype == torch.bfloat16):
        torch._foreach_copy_(b.params, theta)
        return
    for p, x, ti, seed in zip(b.params, theta, t, b.seeds()):
        p.copy_(round_to_bf16(x, tensor_key(seed, ti), like=p))


def _extended_update(b: Bucket, h: Hyper, theta, g_cos, m, vv, t, bc1, bc2, lr, cd) -> None:
    """θ ← θ·decay − (η/bc1)·u with rectification and projection (SPEC §4), per tensor on the
    device (no host sync: the decisions are tensors where the step counts are)."""
    p_class = h.variant.p_class
    rect = h.rectify and p_class != P_ZERO
    if p_class == P_ZERO:
        u = list(torch._foreach_div(m, 1 + h.eps))
    else:
        if p_class == P_HALF:
            d = torch._foreach_sqrt(vv)
            torch._foreach_div_(d, [x**0.5 for x in bc2])
        else:
            d = [power_hat(x, c, h.exponent) for x, c in zip(vv, bc2)]
        if rect:
            u = list(m)  # each set below
        else:
            torch._foreach_add_(d, h.eps)
            u = list(torch._foreach_div(m, d))
    wd = h.weight_decay if h.decoupled else 0.0
    for i in range(len(m)):
        if rect:  # u = m̂/(d + eps/bc2^p) times r_t, or m̂ while not adaptive
            adaptive, r = rectification(h, t[i])
            eps = rectified_eps(h, bc2[i])
            if isinstance(adaptive, Tensor):
                ui = m[i] / (d[i] + (eps.to(cd) if isinstance(eps, Tensor) else eps))
                u[i] = torch.where(adaptive, ui * r.to(cd), m[i])
            elif adaptive:
                u[i] = m[i] / (d[i] + eps) * r
            else:
                u[i] = m[i]
        ratio = 1.0
        if h.projection and theta[i].dim() > 1 and theta[i].numel() > 0:
            u[i], projected = project_on_device(theta[i], g_cos[i], u[i], h.projection_delta, h.eps)
            ratio = torch.where(projected, h.projection_wd_ratio, 1.0).to(cd)
        if wd != 0:
            theta[i].mul_(1 - lr * wd * ratio)
        theta[i].sub_(u[i] * (lr / bc1[i]))


def project_on_device(theta: Tensor, g: Tensor, u: Tensor, delta: float, eps: float):
    """:func:`reference.project` without a host sync: (u, projected as a bool tensor)."""
    shape = theta.shape
    rows = shape[0]
    t2, g2, u2 = theta.reshape(rows, -1), g.reshape(rows, -1), u.reshape(rows, -1)
    tt, gg = (t2 * t2).sum(1), (g2 * g2).sum(1)
    tg, tu = (t2 * g2).sum(1), (t2 * u2).sum(1)
    tn, gn = tt.sqrt(), gg.sqrt()
    cos = (tg / (tn.clamp_min(eps) * gn.clamp_min(eps))).abs()
    by_row = cos.amax() < delta / math.sqrt(t2.shape[1])
    tn_all, gn_all = tt.sum().sqrt(), gg.sum().sqrt()
    cos_all = (tg.sum() / (tn_all.clamp_min(eps) * gn_all.clamp_min(eps))).abs()
    by_layer = cos_all < delta / math.sqrt(theta.numel())
    # u ← u − θ·k per row: k = Σ_row(θu)/(‖θ‖_row + eps)² (channel) or the layer's (layer)
    k_row = tu / (tn + eps) ** 2
    k_layer = tu.sum() / (tn_all + eps) ** 2
    zero = torch.zeros_like(k_row)
    k = torch.where(by_row, k_row, torch.where(by_layer, k_layer.expand_as(k_row), zero))
    return (u2 - t2 * k[:, None]).reshape(shape), by_row | by_layer


class ForeachBackend:
    name = "foreach"
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
        groups: dict[int, list[int]] = {}
        hypers: dict[int, Hyper] = {}
        for i, h in enumerate(bucket.hypers):
            groups.setdefault(id(h), []).append(i)
            hypers[id(h)] = h
        for hid, idx in groups.items():
            _group_step(bucket.subset(idx), hypers[hid], grad_scale)


register(ForeachBackend())
