"""Who runs in a cell: torch.optim.AdamW variants, every usable SMES backend, the roofline.

A :class:`Spec` says how to build a competitor on a cell's parameters (whose ``.grad`` is set):
``build(params)`` returns the step to time and a function giving the state tensors it owns, by
(param index, role): the roles are torch's state names ("step", "exp_avg", "exp_avg_sq",
"max_exp_avg_sq"), and the roofline's buffers take the roles of the state they stand for.
All optimizers use the same hyperparameters, AdamW's defaults (lr 1e-3, betas (0.9, 0.999),
eps 1e-8, weight decay 1e-2, decoupled), which SMES shares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .roofline import roofline
from .timing import Step

StateFn = Callable[[], dict[tuple[int, str], Tensor]]
REFERENCE = "AdamW fused"  # the competitor every ratio is taken against

# SMES backends benchmarked by default on each device type; "reference" (per-tensor Python)
# and Triton on CPU (only under TRITON_INTERPRET=1) are left out, but --backends may ask.
DEFAULT_BACKENDS = {"cpu": ("foreach", "cpu"), "cuda": ("foreach", "cuda", "triton")}


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    bytes_per_param: float  # bytes one step must move per parameter (mean over the set)
    build: Callable[[list[Tensor]], tuple[Step, StateFn]]


def bytes_per_param(
    exponent: float,
    dtype: torch.dtype = torch.float32,
    projected: float = 0.0,
    state_dtype: torch.dtype | None = None,
) -> float:
    """SMES: read θ, g, m, v and write θ, m, v (7 tensors); at p = 0 v is untouched (5). State
    has the params' dtype unless ``state_dtype`` says otherwise (bf16 params with float32 state:
    3·2 + 4·4 = 22 B; with bf16 state 14 B; float32 28 B).

    With the projection (SPEC §4) a tensor of dim > 1 takes two passes: the moments and row sums
    (read θ, g, m, v; write m, v) then the projected update (read θ, m, v; write θ): 40 B per
    float32 parameter (28 B at p = 0). ``projected`` is the fraction of the parameters in such
    tensors; the result is the mean over all of them."""
    ps = torch.empty((), dtype=dtype).element_size()
    ss = torch.empty((), dtype=state_dtype or dtype).element_size()
    moments = 1 if exponent == 0 else 2  # m, or m and v
    plain = 3 * ps + 2 * moments * ss
    two_pass = 4 * ps + (3 if exponent == 0 else 6) * ss
    b = (1 - projected) * plain + projected * two_pass
    return int(b) if b == int(b) else round(b, 1)


def specs(
    device: torch.device,
    exponent: float,
    backends: Iterable[str],
    *,
    unfused_adamw: bool,
    compile: bool,
    dtype: torch.dtype = torch.float32,
    projection: bool = False,
    projected: float = 0.0,
    clip: float | None = None,
    smes_state: torch.dtype | None = None,
    stochastic_rounding: bool = False,
) -> list[Spec]:
    """The competitors of one cell. Fused AdamW, the reference of every ratio, is in all of
    them; AdamW's foreach and for-loop implementations only where ``unfused_adamw``.
    ``projection``: SMES with projection=True, ``projected`` the fraction of parameters in
    tensors of dim > 1 (the ones it projects). ``clip``: every AdamW runs after
    ``clip_grad_norm_(foreach=True)`` (+12 B/param: the norm's read, the scaling's read and
    write) and SMES with ``max_grad_norm=clip`` (+4 B/param: the norm's read; the coefficient is
    applied in the step's own read of g). ``smes_state``: SMES's state dtype (None: the params'
    dtype, as fused AdamW keeps its state). ``stochastic_rounding``: each SMES backend also as
    ``SMES <backend> SR``, with stochastic_rounding=True (bf16 params; the same bytes)."""
    size = torch.empty((), dtype=dtype).element_size()
    adamw_bytes = bytes_per_param(0.5, dtype) + (3 * size if clip is not None else 0)
    smes_extra = size if clip is not None else 0
    out = [Spec(REFERENCE, adamw_bytes, _adamw(clip, fused=True))]
    if unfused_adamw:
        out.append(Spec("AdamW foreach", adamw_bytes, _adamw(clip, foreach=True)))
        out.append(Spec("AdamW for-loop", adamw_bytes, _adamw(clip, foreach=False)))
    if compile:
        out.append(Spec("AdamW compiled", adamw_bytes, _adamw(clip, compiled=True)))
    state_dtype = (
        smes_state if smes_state is not None else (None if dtype == torch.float32 else "param")
    )
    for b in backends:
        nbytes = bytes_per_param(exponent, dtype, projected if projection else 0.0, smes_state)
        nbytes += smes_extra
        out.append(Spec(f"SMES {b}", nbytes, _smes(b, exponent, state_dtype, projection, clip)))
        if stochastic_rounding:
            sr = _smes(b, exponent, state_dtype, projection, clip, stochastic_rounding=True)
            out.append(Spec(f"SMES {b} SR", nbytes, sr))
    roof = roofline(device, dtype)
    if roof is not None:
        name, nbytes, build = roof
        out.append(Spec(name, nbytes, lambda params: _buffers(*build(params))))
    return out


def smes_backends(device: torch.device, requested: Iterable[str] | None) -> dict[str, str | None]:
    """Each SMES backend considered → None if it will run, else why it is skipped."""
    try:
        import smes_fused

        available = smes_fused.available_backends()
    except Exception as e:  # the package itself is broken: benchmark torch alone, say why
        return {"smes_fused": f"import failed: {type(e).__name__}: {e}"}
    wanted = tuple(requested) if requested else DEFAULT_BACKENDS.get(device.type, ())
    out: dict[str, str | None] = {}
    for b in wanted:
        if b not in available:
            out[b] = "unknown backend"
        elif b == "triton" and device.type != "cuda":
            out[b] = "Triton runs on CPU only interpreted (TRITON_INTERPRET=1): not benchmarked"
        elif b == "cuda" and device.type != "cuda":
            out[b] = "needs a CUDA device"
        else:
            out[b] = available[b]
    return out


def _optimizer(opt: torch.optim.Optimizer, step: Step | None = None) -> tuple[Step, StateFn]:
    params = [p for group in opt.param_groups for p in group["params"]]

    def state() -> dict[tuple[int, str], Tensor]:
        return {
            (i, name): t
            for i, p in enumerate(params)
            for name, t in opt.state.get(p, {}).items()
            if isinstance(t, Tensor)
        }

    return step or opt.step, state


def _buffers(step: Step, buffers: dict[tuple[int, str], Tensor]) -> tuple[Step, StateFn]:
    return step, lambda: buffers


def _adamw(
    clip: float | None = None, compiled: bool = False, **kwargs
) -> Callable[[list[Tensor]], tuple[Step, StateFn]]:
    """AdamW; with ``clip``, ``clip_grad_norm_(foreach=True)`` before each step (the usual
    clipped step: the norm's read of g, then a read and write of g to scale it). ``compiled``:
    the step (clipping included) under ``torch.compile``, the recipe of the "Compiling the
    optimizer" tutorial; compilation happens in the first step, which the suite reports as
    first_step_s."""

    def build(params: list[Tensor]) -> tuple[Step, StateFn]:
        opt = torch.optim.AdamW(params, **kwargs)
        if clip is None and not compiled:
            return _optimizer(opt)

        def step() -> None:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            opt.step()

        return _optimizer(opt, torch.compile(step, fullgraph=False) if compiled else step)

    return build


def _smes(
    backend: str,
    exponent: float,
    state_dtype: str | None = None,
    projection: bool = False,
    clip: float | None = None,
    stochastic_rounding: bool = False,
) -> Callable[[list[Tensor]], tuple[Step, StateFn]]:
    def build(params: list[Tensor]) -> tuple[Step, StateFn]:
        from smes_fused import SMES

        opt = SMES(params, exponent=exponent, backend=backend, state_dtype=state_dtype,
                   projection=projection, max_grad_norm=clip,
                   stochastic_rounding=stochastic_rounding)  # fmt: skip
        return _optimizer(opt)

    return build
