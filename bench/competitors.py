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
    bytes_per_param: int  # bytes one step must move per parameter
    build: Callable[[list[Tensor]], tuple[Step, StateFn]]


def bytes_per_param(exponent: float) -> int:
    """float32 SMES: read θ, g, m, v and write θ, m, v; at p = 0 v is untouched."""
    return 20 if exponent == 0 else 28


def specs(
    device: torch.device,
    exponent: float,
    backends: Iterable[str],
    *,
    unfused_adamw: bool,
    compile: bool,
) -> list[Spec]:
    """The competitors of one cell. Fused AdamW, the reference of every ratio, is in all of
    them; AdamW's foreach and for-loop implementations only where ``unfused_adamw``."""
    out = [Spec(REFERENCE, 28, _adamw(fused=True))]
    if unfused_adamw:
        out.append(Spec("AdamW foreach", 28, _adamw(foreach=True)))
        out.append(Spec("AdamW for-loop", 28, _adamw(foreach=False)))
    if compile:
        out.append(Spec("AdamW compiled", 28, _compiled_adamw))
    for b in backends:
        out.append(Spec(f"SMES {b}", bytes_per_param(exponent), _smes(b, exponent)))
    name, nbytes, build = roofline(device)
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


def _adamw(**kwargs) -> Callable[[list[Tensor]], tuple[Step, StateFn]]:
    return lambda params: _optimizer(torch.optim.AdamW(params, **kwargs))


def _compiled_adamw(params: list[Tensor]) -> tuple[Step, StateFn]:
    # The recipe of the "Compiling the optimizer" tutorial; compilation happens in the first
    # step, which the suite reports as first_step_s.
    opt = torch.optim.AdamW(params)

    @torch.compile(fullgraph=False)
    def step() -> None:
        opt.step()

    return _optimizer(opt, step)


def _smes(backend: str, exponent: float) -> Callable[[list[Tensor]], tuple[Step, StateFn]]:
    def build(params: list[Tensor]) -> tuple[Step, StateFn]:
        from smes_fused import SMES

        return _optimizer(SMES(params, exponent=exponent, backend=backend))

    return build
