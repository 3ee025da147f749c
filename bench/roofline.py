"""The memory roofline the suite measures itself, run as one more competitor of each cell.

- CPU with the compiled extension: ``torch.ops.smes_fused.roofline_``, a kernel with exactly the
  optimizer's memory pattern (read θ, g, m, v; write θ, m, v: 28 B/param) and its parallel split,
  with trivial math.
- CPU without it: three in-place ``torch._foreach_*`` passes, θ += 1e-12·g, m += g, v += g·g.
  They move 36 B/param (g is read three times), which is what the row's GB/s counts.
- CUDA: a device-to-device copy of 14 bytes per parameter (28 B/param moved, read + write); for
  16-bit params (16-bit state, as fused AdamW keeps it) 7 bytes (14 B/param moved).

It runs on the cell's own parameters and gradients (CPU) or on buffers of the cell's total size
(CUDA), so every shape set gets the roofline of its own layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .timing import Step

Roofline = tuple[str, int, Callable[[list[Tensor]], tuple[Step, list[Tensor]]]]


def compiled_op() -> Callable | None:
    """``smes_fused._ops.roofline`` (the ``roofline_`` op) if the extension is built, else None."""
    try:
        from smes_fused import _ops
    except ImportError:
        return None
    if not _ops.HAVE_C or not hasattr(torch.ops.smes_fused, "roofline_"):
        return None
    return _ops.roofline


def roofline(device: torch.device, dtype: torch.dtype = torch.float32) -> Roofline | None:
    """(name, bytes moved per parameter, build(params) -> (step, buffers it allocated, by role)),
    or None where the suite has none: 16-bit params on CPU (the ``roofline_`` op is float32)."""
    if device.type == "cuda":
        size = torch.empty((), dtype=dtype).element_size()
        return "roofline: D2D copy", 7 * size, lambda params: _copy(params, 7 * size // 2)
    if dtype != torch.float32:
        return None
    op = compiled_op()
    if op is not None:
        return "roofline: smes_fused.roofline_", 28, lambda params: _kernel(op, params)
    return "roofline: torch foreach", 36, _foreach


def _state(m: list[Tensor], v: list[Tensor]) -> dict[tuple[int, str], Tensor]:
    """The buffers by the roles of the optimizer state they stand for (see bench.runner)."""
    out = {(i, "exp_avg"): t for i, t in enumerate(m)}
    out.update({(i, "exp_avg_sq"): t for i, t in enumerate(v)})
    return out


def _kernel(op: Callable, params: list[Tensor]) -> tuple[Step, dict]:
    grads = [p.grad for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step() -> None:
        op(params, grads, m, v)

    return step, _state(m, v)


def _foreach(params: list[Tensor]) -> tuple[Step, dict]:
    grads = [p.grad for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step() -> None:
        torch._foreach_add_(params, grads, alpha=1e-12)  # reads and writes θ, leaves it as is
        torch._foreach_add_(m, grads)
        torch._foreach_addcmul_(v, grads, grads)  # v stays >= 0 (state is shared, see runner)

    return step, _state(m, v)


def _copy(params: list[Tensor], nbytes: int = 14) -> tuple[Step, dict]:
    n = sum(p.numel() for p in params)
    src = torch.ones(nbytes * n, dtype=torch.uint8, device=params[0].device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), {(0, "copy source"): src, (0, "copy target"): dst}
