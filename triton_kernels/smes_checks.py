"""What the SMES Triton kernels assume of the tensors they are given (host side, no kernels).

The kernel walks every tensor as a flat run of ``numel`` elements from its ``data_ptr``, the same
run for the param, its grad and its state: so each tensor must be non-overlapping and dense, and
all of a param's tensors must share its layout. Strides of size-1 dims do not count (autograd's
layout contract ignores them: a ``(1, 8)`` param may get a grad with strides ``(1, 1)``).
"""

from __future__ import annotations

import torch

_WHO = "smes_fused triton backend"


class LayoutError(RuntimeError):
    """A tensor the kernel cannot walk as a flat run (not dense, or laid out unlike its param):
    raised before anything is written; the backend applies such tensors per tensor instead."""


def walkable(p: torch.Tensor, *others: torch.Tensor | None, projection: bool = False) -> bool:
    """Whether the kernel can walk ``p`` and its grad/state tensors (None entries skipped); with
    ``projection`` (a variant that projects), a param of dim > 1 must also be contiguous: the
    projection walks rows (check_static's LayoutError)."""
    if projection and p.dim() > 1 and not p.is_contiguous():
        return False
    return dense(p) and all(x is None or (dense(x) and same_layout(x, p)) for x in others)


def dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense, in any dim order (contiguous, channels_last, permuted)."""
    dims = sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def same_layout(x: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same shape, and the same stride in every dim of size > 1."""
    if x.shape != ref.shape:
        return False
    return all(a == b for sz, a, b in zip(ref.shape, x.stride(), ref.stride()) if sz != 1)


def check_tensor(x: torch.Tensor, p: torch.Tensor, what: str, i: int, dtype, device) -> None:
    if x.device != device or x.dtype != dtype or x.shape != p.shape:
        raise RuntimeError(
            f"{_WHO}: {what}[{i}] is {x.dtype} of shape {tuple(x.shape)} on {x.device}, where "
            f"{dtype} of shape {tuple(p.shape)} on {device} was expected"
        )
    if not dense(x) or not same_layout(x, p):
        raise LayoutError(
            f"{_WHO}: {what}[{i}] has strides {x.stride()} for shape {tuple(x.shape)}; each "
            f"tensor must be dense and share its parameter's strides {p.stride()} (size-1 dims "
            "aside)"
        )


def check_static(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, rows, variant) -> None:
    """Params, state and step counts of the given rows (checked when their addresses change)."""
    p0 = params[0]
    device, pdt, sdt = p0.device, p0.dtype, exp_avgs[0].dtype
    for i in rows:
        p = params[i]
        check_tensor(p, p, "params", i, pdt, device)
        if getattr(variant, "projection", False) and p.dim() > 1 and not p.is_contiguous():
            raise LayoutError(
                f"{_WHO}: params[{i}] (projection=True) has strides {p.stride()} for shape "
                f"{tuple(p.shape)}; the projection walks rows of contiguous tensors"
            )
        check_tensor(exp_avgs[i], p, "exp_avgs", i, sdt, device)
        if variant.track_v:
            check_tensor(exp_avg_sqs[i], p, "exp_avg_sqs", i, sdt, device)
        if variant.amsgrad:
            check_tensor(max_exp_avg_sqs[i], p, "max_exp_avg_sqs", i, sdt, device)
        s = steps[i]
        if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
            raise RuntimeError(
                f"{_WHO}: steps[{i}] must be a one-element float32 tensor on {device}, got "
                f"{s.dtype} of {s.numel()} elements on {s.device}"
            )


def check_grads(params, grads, rows) -> None:
    """The grads of the given rows (checked when their addresses change)."""
    p0 = params[0]
    dtype, device = p0.dtype, p0.device
    for i in rows:
        g, p = grads[i], params[i]
        # The usual case, cheaply: the param's own strides (the param itself was checked dense).
        if (
            g.stride() == p.stride()
            and g.dtype == dtype
            and g.device == device
            and (g.shape == p.shape)
        ):
            continue
        check_tensor(g, p, "grads", i, dtype, device)
