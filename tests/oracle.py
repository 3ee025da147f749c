"""An independent evaluation of SPEC §1, written here from the spec (not from smes_fused).

``spec_step(..., dtype=torch.float64)`` is the float64 truth the tolerances of SPEC §6 are
measured against; ``dtype=torch.float32`` gives "what float32 can do" for the ill-conditioned
allowance.
"""

from __future__ import annotations

import math

import torch

RTOL = {0.0: 2e-6, 0.5: 2e-6}  # SPEC §6; 1e-5 for every other exponent
ATOL = 1e-7


def rtol_for(p: float) -> float:
    return RTOL.get(p, 1e-5)


def spec_step(
    param,
    grad,
    m,
    v=None,
    vmax=None,
    *,
    step: int,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    exponent=0.5,
    weight_decay=1e-2,
    decoupled_weight_decay=True,
    amsgrad=False,
    maximize=False,
    bias_correction=True,
    grad_scale=None,
    dtype=torch.float64,
    fused_l2=False,
    projection=False,
    projection_delta=0.1,
    projection_wd_ratio=0.1,
    rectify=False,
    second_moment="ema",
):
    """One step of SPEC §1. Returns new (param, m, v, vmax) in ``dtype`` (v/vmax None if absent).

    ``fused_l2`` rounds g + λθ once (torch.add(..., alpha=λ)) instead of twice: a second valid
    float32 evaluation order, used to judge what float32 can do on ill-conditioned inputs.
    """
    b1, b2 = betas
    th = param.detach().to(dtype).clone()
    g = grad.detach().to(dtype).clone()
    m = m.detach().to(dtype).clone()
    v = None if v is None else v.detach().to(dtype).clone()
    vmax = None if vmax is None else vmax.detach().to(dtype).clone()
    if maximize:
        g = -g
    if grad_scale is not None:
        g = g * (1.0 / float(grad_scale))
    g_cos = g  # SPEC §4: projection's cosine uses the gradient before L2
    decay = 1.0
    if weight_decay != 0:
        if decoupled_weight_decay:
            decay = 1 - lr * weight_decay
        else:
            g = torch.add(g, th, alpha=weight_decay) if fused_l2 else g + weight_decay * th
    m = b1 * m + (1 - b1) * g
    if v is not None:
        v = v + g * g if second_moment == "sum" else b2 * v + (1 - b2) * g * g
        if amsgrad:
            vmax = torch.maximum(vmax, v)
    bc1, bc2 = (1 - b1**step, 1 - b2**step) if bias_correction else (1.0, 1.0)
    if second_moment == "sum":
        bc2 = 1.0
    vv = vmax if (amsgrad and v is not None) else v
    adaptive, r = True, 1.0
    eps_d = eps  # the denominator's; the projection's is eps
    if rectify and exponent != 0:
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * step * b2**step / (1 - b2**step)
        adaptive = rho_t > 5
        if adaptive:  # torch's RAdam: eps before the bias correction, (v^p + eps)/bc2^p
            eps_d = eps / bc2**exponent
            num = (rho_t - 4) * (rho_t - 2) * rho_inf
            r = math.sqrt(num / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    if not adaptive:  # RAdam's un-adapted steps: u = m-hat, no eps
        d = torch.ones_like(th)
    elif exponent == 0:
        d = torch.full_like(th, 1 + eps)
    elif exponent == 0.5:
        d = vv.sqrt() / math.sqrt(bc2) + eps_d
    else:
        d = (vv / bc2) ** exponent + eps_d
    u = m / d * r
    if projection and th.dim() > 1 and th.numel() > 0:
        # SPEC §4, from the spec: per output channel, then per layer
        for rows in (th.shape[0], 1):
            t2, g2 = th.reshape(rows, -1), g_cos.reshape(rows, -1)
            tn, gn = t2.norm(dim=1), g2.norm(dim=1)
            cos = ((t2 * g2).sum(1) / (tn.clamp_min(eps) * gn.clamp_min(eps))).abs()
            if cos.max() < projection_delta / math.sqrt(t2.shape[1]):
                unit = t2 / (tn[:, None] + eps)
                u2 = u.reshape(rows, -1)
                u = (u2 - unit * (unit * u2).sum(1, keepdim=True)).reshape(th.shape)
                if decoupled_weight_decay and weight_decay != 0:
                    decay = 1 - lr * weight_decay * projection_wd_ratio
                break
    th = th * decay - (lr / bc1) * u
    return th, m, v, vmax


def worst_ratio(new, old, ref, rtol, f32=None) -> float:
    """max over elements of |new - ref| / tolerance; <= 1 passes SPEC §6.

    With ``f32`` (plain float32 evaluations: one tensor or several valid orders), the tolerance
    is widened by 4x float32's own (worst) error, SPEC §6's allowance for ill-conditioned rules.
    """
    if new.numel() == 0:
        return 0.0
    new = new.detach().double()
    old = old.detach().double()
    ref = ref.detach().double()
    tol = rtol * (new.abs() + old.abs()) + ATOL
    if f32 is not None:
        f32 = [f32] if torch.is_tensor(f32) else f32
        f32_err = torch.stack([(f.detach().double() - ref).abs() for f in f32]).amax(0)
        tol = tol + 4 * f32_err
    err = (new - ref).abs()
    bad_nan = torch.isnan(new) != torch.isnan(ref)
    if bad_nan.any():
        return math.inf
    ratio = torch.where(torch.isnan(ref), torch.zeros_like(err), err / tol)
    return float(ratio.max())


# Worst parity ratio seen per backend (error / SPEC §6 tolerance), printed at the end of the run.
WORST: dict[str, float] = {}


def record(backend: str, ratio: float) -> float:
    WORST[backend] = max(WORST.get(backend, 0.0), ratio)
    return ratio


def host_backends() -> list[str]:
    """SMES backends that run on CPU tensors here (the fused GPU ones are tested elsewhere)."""
    from smes_fused import available_backends

    ok = available_backends()
    return [n for n in ("reference", "foreach", "cpu") if ok.get(n, "absent") is None]
