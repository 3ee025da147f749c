"""Functional SMES: validation, bucketing and dispatch to the backends.

``smes(...)`` is the torch-style entry point for one group of tensors (like
``torch.optim.adamw.adamw``). :class:`smes_fused.SMES` gathers all of its param groups into
buckets with :func:`add_to_buckets` and applies them with :func:`apply`, so that a fused backend
covers every tensor of a (device, param dtype, state dtype) bucket in one launch.
"""

from __future__ import annotations

import inspect
import math
import numbers
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ops, backends
from ._bucket import Bucket, BucketKey, Hyper
from ._rounding import tensor_salt

__all__ = [
    "smes",
    "check_hyper",
    "check_grad",
    "check_grads",
    "make_hyper",
    "add_to_buckets",
    "apply",
]

_BACKEND_NAMES = ("auto",) + backends.NAMES


def check_backend_name(backend) -> None:
    if backend not in _BACKEND_NAMES:
        raise ValueError(
            f"Invalid backend: {backend!r}; expected one of {', '.join(map(repr, _BACKEND_NAMES))}"
        )


def _real(name: str, x) -> float:
    if isinstance(x, Tensor):
        raise TypeError(
            f"Invalid {name}: {x!r}; a tensor is taken for lr only: pass a Python float"
        )
    if isinstance(x, bool) or not isinstance(x, numbers.Real):  # numpy reals are Real
        raise TypeError(f"Invalid {name}: {x!r}; expected a real number")
    x = float(x)
    # false for inf and NaN; unlike math.isfinite this traces under torch.compile as a guard,
    # without specialising the graph on x (an exponent schedule changes p every step)
    if not abs(x) <= sys.float_info.max:
        raise ValueError(f"Invalid {name}: {x}; expected a finite number")
    return x


def plain_value(x):
    """A numpy scalar (number, bool or string) as the Python value it equals, anything else
    unchanged: the groups SMES makes hold Python values, so that a checkpoint loads with
    ``torch.load(weights_only=True)``, which refuses numpy types, and a flag given as
    ``np.True_`` is taken as torch's optimizers take it."""
    if type(x).__module__ == "numpy" and getattr(x, "ndim", None) == 0 and hasattr(x, "item"):
        return x.item()
    return x


def first_repeat(items):
    """The labels of the first tensor met twice in ``items``, ``(label, tensor)`` pairs (None
    tensors skipped), by identity (views sharing memory are not caught); None if there is none.
    A tensor updated twice per step would be a data race in the fused kernels."""
    seen: dict[int, object] = {}
    for label, t in items:
        if t is not None:
            if id(t) in seen:
                return seen[id(t)], label
            seen[id(t)] = label
    return None


def check_hyper(
    *,
    lr,
    betas,
    eps,
    weight_decay,
    exponent,
    track_second_moment: bool = True,
    projection=False,
    projection_delta=0.1,
    projection_wd_ratio=0.1,
    rectify=False,
    second_moment="ema",
    stochastic_rounding=False,
    rounding_seed=0,
) -> None:
    """Raise ValueError/TypeError naming the parameter, its value and the accepted range."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(
                f"Invalid lr: a tensor lr must be a 1-element float tensor, got shape "
                f"{tuple(lr.shape)} and dtype {lr.dtype}"
            )
        if lr.device.type == "cpu":  # a device lr is not read back (no host sync)
            value = float(lr)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Invalid learning rate: {value}; expected lr >= 0")
    else:
        lr = _real("lr", lr)
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}; expected lr >= 0")
    eps = _real("eps", eps)
    if eps < 0:
        raise ValueError(f"Invalid epsilon value: {eps}; expected eps >= 0")
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)") from None
    for i, b in enumerate((b1, b2)):
        b = _real(f"beta{i + 1}", b)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}; expected 0 <= beta < 1")
    wd = _real("weight_decay", weight_decay)
    if wd < 0:
        raise ValueError(f"Invalid weight_decay value: {wd}; expected weight_decay >= 0")
    p = _real("exponent", exponent)
    # (the test of p last: under torch.compile a guard on p only where it decides)
    if eps == 0 and p > 0:
        raise ValueError(
            f"Invalid eps: 0 with exponent={p}; exponent > 0 needs eps > 0 (v = 0 would give 0/0)"
        )
    if not track_second_moment and p != 0:
        raise ValueError(
            f"Invalid exponent: {p} for a group created with exponent=0, which keeps no "
            "exp_avg_sq; create the group with track_second_moment=True to change its exponent"
        )
    for name, flag in (
        ("projection", projection),
        ("rectify", rectify),
        ("stochastic_rounding", stochastic_rounding),
    ):
        if not isinstance(plain_value(flag), bool):  # np.True_ taken, as torch takes it
            raise TypeError(f"Invalid {name}: {flag!r}; expected True or False")
    delta = _real("projection_delta", projection_delta)
    if delta < 0:
        raise ValueError(f"Invalid projection_delta: {delta}; expected projection_delta >= 0")
    ratio = _real("projection_wd_ratio", projection_wd_ratio)
    if ratio < 0:
        raise ValueError(f"Invalid projection_wd_ratio: {ratio}; expected projection_wd_ratio >= 0")
    if (
        isinstance(rounding_seed, bool)
        or not isinstance(rounding_seed, numbers.Integral)
        or not 0 <= rounding_seed < 2**32
    ):
        raise ValueError(
            f"Invalid rounding_seed: {rounding_seed!r} ({type(rounding_seed).__name__}); "
            "expected an integer in [0, 2**32)"
        )
    if second_moment not in ("ema", "sum"):
        raise ValueError(
            f"Invalid second_moment: {second_moment!r}; expected 'ema' (Adam's moving average) "
            "or 'sum' (AdaGrad's accumulation)"
        )


def check_param(param: Tensor) -> None:
    """A parameter SMES can optimize, or a clear error."""
    if param.is_complex():
        raise TypeError(
            "SMES does not support complex parameters; optimize torch.view_as_real(param) "
            f"instead (got a {param.dtype} parameter of shape {tuple(param.shape)})"
        )
    if not param.is_floating_point():
        raise TypeError(f"SMES needs floating-point parameters, got {param.dtype}")


def check_grad(param: Tensor, grad: Tensor) -> None:
    """A gradient the backends can apply to ``param``, or a clear error."""
    check_param(param)
    if grad.is_sparse or grad.layout != torch.strided:
        raise RuntimeError(f"SMES does not support sparse gradients (got layout {grad.layout})")
    if grad.shape != param.shape:
        raise ValueError(
            f"gradient shape {tuple(grad.shape)} does not match its parameter's shape "
            f"{tuple(param.shape)}"
        )
    if grad.dtype != param.dtype:
        raise TypeError(f"gradient dtype {grad.dtype} does not match its parameter's {param.dtype}")
    if grad.device != param.device:
        raise RuntimeError(
            f"gradient device {grad.device} does not match its parameter's {param.device}"
        )


def check_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """:func:`check_grad` for every (param, grad) pair whose grad is not None, cheaply: a step's
    gradients are compared with their params on every step (in C++ when the extension is built,
    ~20 ns a pair), and the first mismatch is reported by :func:`check_grad`."""
    bad = _ops.first_misfit(params, grads)
    if bad is not None:
        check_grad(params[bad], grads[bad])


def scalar_tensor(name: str, t) -> Tensor | None:
    """``grad_scale`` / ``found_inf`` checked (None or a 1-element floating-point tensor) and
    viewed as 0-d, the shape every backend reads (GradScaler passes 0-d ones; ``[1]`` is
    accepted too)."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(
            f"Invalid {name}: {t!r}; expected a 1-element floating-point tensor (as "
            "torch.amp.GradScaler passes it) or None"
        )
    if t.numel() != 1 or not t.is_floating_point() or t.device.type == "meta":
        raise ValueError(
            f"Invalid {name}: expected a 1-element floating-point tensor, got shape "
            f"{tuple(t.shape)}, dtype {t.dtype} on {t.device}"
        )
    return t.view(())


# check_hyper's keywords with their defaults (the SPEC §4 options and track_second_moment).
OPTION_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(check_hyper).parameters.items()
    if p.default is not inspect.Parameter.empty
}
# Every keyword of make_hyper: a param group's keys that reach the backends.
HYPER_KEYS = (
    "decoupled_weight_decay",
    "amsgrad",
    "maximize",
    "bias_correction",
    *inspect.signature(check_hyper).parameters,
)


def make_hyper(*, decoupled_weight_decay, amsgrad, maximize, bias_correction, **options) -> Hyper:
    """Validated hyperparameters as the backends read them. ``options``: the keywords of
    :func:`check_hyper` (which validates them), those with defaults optional."""
    check_hyper(**options)
    o = {**OPTION_DEFAULTS, **options}
    lr = o["lr"]
    return Hyper(
        # A tensor lr of any shape with one element ([], [1], [1, 1]) is read through a 0-d view,
        # so a scheduler's in-place update of the group's tensor is seen.
        # Under torch.compile a float lr is kept as dynamo passes it (see check_hyper).
        lr=lr.view(())
        if isinstance(lr, Tensor)
        else (lr if torch.compiler.is_compiling() else float(lr)),
        beta1=float(o["betas"][0]),
        beta2=float(o["betas"][1]),
        eps=float(o["eps"]),
        exponent=float(o["exponent"]),
        weight_decay=float(o["weight_decay"]),
        decoupled=bool(decoupled_weight_decay),
        amsgrad=bool(amsgrad),
        maximize=bool(maximize),
        bias_correction=bool(bias_correction),
        track_v=bool(o["track_second_moment"]),
        projection=bool(o["projection"]),
        projection_delta=float(o["projection_delta"]),
        projection_wd_ratio=float(o["projection_wd_ratio"]),
        rectify=bool(o["rectify"]),
        second_moment_sum=o["second_moment"] == "sum",
        stochastic_rounding=bool(o["stochastic_rounding"]),
        rounding_seed=int(o["rounding_seed"]),
    )


def rounding_salt(h: Hyper, param: Tensor, position: int, offset: int = 0) -> int:
    """The salt of a param's rounding seed (``_rounding.tensor_salt``): 0 unless it is
    rounded stochastically (a bf16 param in a group with ``stochastic_rounding``)."""
    if not (h.stochastic_rounding and param.dtype == torch.bfloat16):
        return 0
    return tensor_salt(position, offset)


def add_to_buckets(
    buckets: dict[BucketKey, Bucket], param, grad, m, v, vmax, step, h, salt: int = 0
) -> None:
    key = BucketKey(param.device, param.dtype, m.dtype)
    b = buckets.get(key)
    if b is None:
        b = buckets[key] = Bucket(key)
    vmax = vmax if h.variant.amsgrad else None
    b.append(param, grad, m, v if h.track_v else None, vmax, step, h, salt)


def resolve(keys, backend: str) -> dict[BucketKey, object]:
    """The backend of every bucket key; raises before anything is touched if one cannot run."""
    return {key: backends.resolve(backend, key) for key in keys}


def apply(
    buckets: dict[BucketKey, Bucket],
    chosen: dict[BucketKey, object],
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Apply every bucket with its backend, which also advances the step counts (unless
    ``found_inf`` is non-zero: then nothing changes, with no host sync on the fused paths)."""
    live = [(key, bucket) for key, bucket in buckets.items() if len(bucket)]
    # Each backend checks what it launches before writing it, but a step may be several
    # launches (buckets; a bucket's state kinds or variants): a refusal in a later one would
    # leave the earlier ones stepped. So every bucket is checked before any is stepped.
    for _, bucket in live:
        bucket.check_state()
    if len(live) > 1:  # one bucket's own refusal changes nothing
        for b in {id(chosen[k]): chosen[k] for k, _ in live}.values():
            getattr(b, "check_ready", lambda: None)()
    for key, bucket in live:
        dev = key.device
        gs = None if grad_scale is None else grad_scale.to(dev, torch.float32, non_blocking=True)
        fi = None if found_inf is None else found_inf.to(dev, torch.float32, non_blocking=True)
        chosen[key](bucket, grad_scale=gs, found_inf=fi)


def smes(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor | None],
    max_exp_avg_sqs: Sequence[Tensor | None],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    exponent: float = 0.5,
    weight_decay: float = 1e-2,
    decoupled_weight_decay: bool = True,
    amsgrad: bool = False,
    maximize: bool = False,
    bias_correction: bool = True,
    projection: bool = False,
    projection_delta: float = 0.1,
    projection_wd_ratio: float = 0.1,
    rectify: bool = False,
    second_moment: str = "ema",
    stochastic_rounding: bool = False,
    rounding_seed: int = 0,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str = "auto",
) -> None:
    """One SMES step (SPEC §1) over one group of tensors, in place.

    ``state_steps`` are float32 scalar tensors holding the number of steps taken so far; they are
    advanced by one (not when ``found_inf`` is non-zero). ``exp_avg_sqs`` entries may be None
    only when ``exponent == 0`` (no second moment tracked); ``max_exp_avg_sqs`` entries are used
    only with ``amsgrad`` (without it the list may be empty, as torch's ``adamw()`` gets it).
    """
    check_backend_name(backend)
    n = len(params)
    if not amsgrad and len(max_exp_avg_sqs) == 0:  # as torch's adamw() is called without it
        max_exp_avg_sqs = [None] * n
    lists = (grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    if any(len(x) != n for x in lists):
        raise ValueError(
            "params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs and state_steps "
            "must have the same length"
        )
    track_v = any(v is not None for v in exp_avg_sqs) or n == 0
    if track_v and any(v is None for v in exp_avg_sqs):
        raise ValueError("exp_avg_sqs must be all tensors or all None")
    h = make_hyper(
        lr=lr,
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=weight_decay,
        exponent=exponent,
        decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        bias_correction=bias_correction,
        track_second_moment=track_v,
        projection=projection,
        projection_delta=projection_delta,
        projection_wd_ratio=projection_wd_ratio,
        rectify=rectify,
        second_moment=second_moment,
        stochastic_rounding=stochastic_rounding,
        rounding_seed=rounding_seed,
    )
    grad_scale = scalar_tensor("grad_scale", grad_scale)
    found_inf = scalar_tensor("found_inf", found_inf)
    named = zip(("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
                (params, *lists[1:]))  # fmt: skip
    twice = first_repeat(  # max_exp_avg_sqs only where it is used
        (f"{name}[{i}]", t)
        for name, xs in named
        if name != "max_exp_avg_sqs" or amsgrad
        for i, t in enumerate(xs)
    )
    if twice is not None:
        raise ValueError(
            f"{twice[0]} and {twice[1]} are the same tensor: every param and state tensor must be "
            "a tensor of its own (one updated twice per step would be a data race in the fused "
            "kernels)"
        )
    for i in range(n):
        if grads[i] is None:
            raise ValueError(f"grads[{i}] is None; pass only the tensors that have gradients")
        check_param(params[i])
    check_grads(params, grads)
    buckets: dict[BucketKey, Bucket] = {}
    for i in range(n):
        if h.variant.amsgrad and max_exp_avg_sqs[i] is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sqs tensors")
        add_to_buckets(
            buckets,
            params[i],
            grads[i],
            exp_avgs[i],
            exp_avg_sqs[i],
            max_exp_avg_sqs[i],
            state_steps[i],
            h,
            rounding_salt(h, params[i], i),
        )
    apply(buckets, resolve(buckets, backend), grad_scale=grad_scale, found_inf=found_inf)
