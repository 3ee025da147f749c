"""Host wrapper of the SMES Triton kernels: one step of a list of tensors in two launches.

- ``smes_kernels``: the ``@triton.jit`` kernels and the table layout;
- ``smes_tables``: the device tables, their cache and the uploads of changed rows;
- ``smes_checks``: what the kernels assume of the tensors (dense, shared layout);
- ``smes_op``: the step as a registered op (``torch.ops.smes_fused.triton_step_``), so
  torch.compile keeps it in the graph.

Launches per step (per compile-time variant present in a bucket, usually one): 2, with or
without ``grad_scale``/``found_inf``: the prologue (step counts, scalars) and the element
kernel. Nothing else runs on the device in a steady-state step: the step-count increment and its
rollback under ``found_inf`` are part of the prologue, a device lr of any float dtype is read
where it lives, and unchanged tables are not copied.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
from typing import NamedTuple

import numpy as np
import torch
import triton

from . import smes_kernels as _kernels

if _kernels.INTERPRET != _kernels.interpret_mode():  # the mode changed: create the kernels again
    _kernels = importlib.reload(_kernels)

from . import smes_checks, smes_tables  # noqa: E402
from .smes_tables import ROW, TableCache, capturing, device_guard  # noqa: E402

INTERPRET = _kernels.INTERPRET
TORCH_TO_TL = _kernels.TORCH_TO_TL
_smes_step_kernel = _kernels._smes_step_kernel
_smes_scalars_kernel = _kernels._smes_scalars_kernel
_smes_decide_kernel = _kernels._smes_decide_kernel

LAUNCHES_PER_STEP = 2
LAUNCHES_PER_PROJECTED_STEP = 4  # prologue, moments + row sums, decision, projected update
_COL = (int(_kernels.COL_P), int(_kernels.COL_M), int(_kernels.COL_V), int(_kernels.COL_VMAX),
        int(_kernels.COL_STEP))  # fmt: skip
_COL_G = int(_kernels.COL_G)
_COL_GROUP = int(_kernels.COL_GROUP)
_LR_CODE = {
    torch.float32: int(_kernels.LR_F32),
    torch.float64: int(_kernels.LR_F64),
    torch.bfloat16: int(_kernels.LR_BF16),
    torch.float16: int(_kernels.LR_F16),
}
_LR_SHIFT = int(_kernels.LR_SHIFT)
_FLAG_RECTIFY = int(_kernels.FLAG_RECTIFY)
_FLAG_SUM_V = int(_kernels.FLAG_SUM_V)
_FLAG_SR = int(_kernels.FLAG_SR)

CACHE = TableCache()

# Test hooks: each is called as hook(constexprs: dict, n_blocks: int, pointers: dict) before the
# element kernel's launch (pointers: its pointer arguments' tensors by name).
LAUNCH_HOOKS: list = []


class GroupHyper(NamedTuple):
    """What the kernels read of a param group (``smes_fused._bucket.Hyper`` has the same)."""

    lr: float | torch.Tensor
    beta1: float
    beta2: float
    eps: float
    exponent: float
    weight_decay: float
    bias_correction: bool
    rectify: bool = False
    second_moment_sum: bool = False
    projection_delta: float = 0.1
    projection_wd_ratio: float = 0.1
    stochastic_rounding: bool = False
    rounding_seed: int = 0


def launch_config(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_SIZE, num_warps, tensors per prologue program). On a GPU 1024 elements over 8
    warps: 4 per thread, one 128-bit access per fp32 tensor. The interpreter runs one Python loop
    iteration per program, so it gets larger blocks."""
    if INTERPRET:
        return 4096, 1, 1024
    return 1024, 8, 256


def group_of(hypers, salts=()) -> tuple[list, list[int]]:
    """The distinct hyperparameter objects (one per param group) and each tensor's index. A
    tensor with a rounding salt (``smes_fused``'s ``Bucket.salts``: its seed is its group's XOR
    the salt) gets a group of its own, with that seed."""
    groups: list = []
    index: list[int] = []
    seen: dict = {}
    prev, prev_salt, gprev = None, 0, -1
    for h, s in zip(hypers, salts or itertools.repeat(0)):
        if h is not prev or s != prev_salt:
            gprev = seen.get((id(h), s))
            if gprev is None:
                gprev = seen[id(h), s] = len(groups)
                groups.append(dataclasses.replace(h, rounding_seed=h.rounding_seed ^ s) if s else h)
            prev, prev_salt = h, s
        index.append(gprev)
    return groups, index


def smes_step(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    hypers,
    variant,
    *,
    salts=(),
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """Apply one SMES step to the listed tensors (one compile-time ``variant``) in two launches.

    ``hypers[i]`` has ``lr`` (float or tensor), ``beta1``, ``beta2``, ``eps``, ``exponent``,
    ``weight_decay`` and ``bias_correction``; tensors of one param group share one object.
    ``variant`` has ``p_class``, ``track_v``, ``decoupled``, ``amsgrad`` and ``maximize``.
    ``steps`` are float32 scalars on the params' device holding the steps taken so far: the
    prologue advances them (not when ``found_inf`` is non-zero). ``grad_scale`` / ``found_inf``:
    float32 scalars on the device, or None. ``salts``: per tensor, of its rounding seed (see
    :func:`group_of`), or empty.
    """
    groups, index = group_of(hypers, salts)
    step_groups(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, groups, index,
                variant, grad_scale=grad_scale, found_inf=found_inf)  # fmt: skip


def step_groups(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    groups,
    index: list[int],
    variant,
    *,
    grad_scale=None,
    found_inf=None,
) -> None:
    """:func:`smes_step` with the groups given: ``groups[index[i]]`` is tensor i's."""
    if not params:
        return
    device = params[0].device
    with device_guard(device):  # the launches, the uploads and their events: on this device
        _step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, groups, index,
              variant, grad_scale, found_inf)  # fmt: skip


def _group_row(h, device: torch.device) -> tuple[float, float, int]:
    """(lr value, lr address, flags) of one group: a tensor lr on the device is read by the
    prologue every step (any float dtype, no cast kernel); a CPU tensor lr is read here."""
    lr, addr, code = h.lr, 0, 0
    if isinstance(lr, torch.Tensor):
        if lr.device == device and lr.dtype in _LR_CODE:
            lr, addr, code = 0.0, lr.data_ptr(), _LR_CODE[lr.dtype]
        else:
            lr = float(lr)  # a CPU tensor: no device sync
    flags = (
        (1 if h.bias_correction else 0)
        | (code << _LR_SHIFT)
        | (_FLAG_RECTIFY if h.rectify else 0)
        | (_FLAG_SUM_V if h.second_moment_sum else 0)
        | (_FLAG_SR if h.stochastic_rounding else 0)
    )
    return float(lr), addr, flags


def _group_rows(groups, device) -> np.ndarray:
    out = np.zeros((len(groups), ROW), dtype=np.int64)
    f = out.view(np.float64)
    for r, h in enumerate(groups):
        lr, addr, flags = _group_row(h, device)
        f[r, :5] = (h.beta1, h.beta2, h.eps, h.exponent, h.weight_decay)
        out[r, 5] = flags
        f[r, 6] = lr
        out[r, 7] = addr
        f[r, 8:10] = (h.projection_delta, h.projection_wd_ratio)
        out[r, 10] = h.rounding_seed
    return out


def _key(params, device, pdt, sdt, variant, block_size, n_groups) -> tuple:
    return (
        device,
        pdt,
        sdt,
        tuple(variant),
        block_size,
        n_groups,
        tuple(p.data_ptr() for p in params),
        # the projection walks rows: its tables depend on the shapes, not only the sizes
        tuple(p.shape for p in params) if variant.projection else tuple(p.numel() for p in params),
    )


def projection_rows(params) -> list[int]:
    """Rows per tensor for the projection (SPEC §4): size(0) of a non-empty tensor of dim > 1,
    else 0 (never projected)."""
    return [p.shape[0] if p.dim() > 1 and p.numel() > 0 else 0 for p in params]


def _step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, groups, index, variant,
          grad_scale, found_inf) -> None:  # fmt: skip
    n = len(params)
    device = params[0].device
    pdt, sdt = params[0].dtype, exp_avgs[0].dtype
    block_size, num_warps, block_t = launch_config(device)
    n_groups = len(groups)
    key = _key(params, device, pdt, sdt, variant, block_size, n_groups)
    track_v, amsgrad = variant.track_v, variant.amsgrad
    t = CACHE.lookup(key)
    cap = capturing(device)
    if t is None and cap:  # a second capture after the first froze the table: share it
        t = CACHE.frozen_for(key)
    if t is None:
        smes_checks.check_static(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                                 range(n), variant)  # fmt: skip
        rows = projection_rows(params) if variant.projection else None
        t = CACHE.build(key, [p.numel() for p in params], n_groups, device, block_size, rows)
    # Inside a capture the eager table is left as it is: a copy of its mirror takes the changes.
    mirror = t.mirror.copy() if cap else t.mirror
    lo, hi = n + n_groups, 0

    # The lists the static rows come from (those the variant reads): when they are the very
    # lists of the last step (an optimizer's bucket keeps them), the rows are current.
    sources = (params, exp_avgs, exp_avg_sqs if track_v else None,
               max_exp_avg_sqs if amsgrad else None, steps)  # fmt: skip
    if len(t.sources) != 5 or any(a is not b for a, b in zip(sources, t.sources)):
        static = np.array(
            [
                (
                    params[i].data_ptr(),
                    exp_avgs[i].data_ptr(),
                    exp_avg_sqs[i].data_ptr() if track_v else 0,
                    max_exp_avg_sqs[i].data_ptr() if amsgrad else 0,
                    steps[i].data_ptr(),
                )
                for i in range(n)
            ],
            dtype=np.int64,
        ).reshape(n, 5)
        changed_static = np.nonzero((mirror[:n, _COL] != static).any(axis=1))[0]
        if changed_static.size:
            smes_checks.check_static(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                                     changed_static.tolist(), variant)  # fmt: skip
    else:
        changed_static = np.zeros(0, dtype=np.int64)

    gp = np.fromiter((g.data_ptr() for g in grads), dtype=np.int64, count=n)
    changed = np.nonzero(gp != mirror[:n, _COL_G])[0]
    if changed.size:
        smes_checks.check_grads(params, grads, changed.tolist())
    # Every check passed: only now the mirror takes the new rows (a check that raises must leave
    # it equal to the device table, or a later step would skip uploading these rows).
    if changed_static.size:
        mirror[changed_static[:, None], _COL] = static[changed_static]
        lo, hi = min(lo, int(changed_static[0])), max(hi, int(changed_static[-1]) + 1)
    if changed.size:
        mirror[changed, _COL_G] = gp[changed]
        lo, hi = min(lo, int(changed[0])), max(hi, int(changed[-1]) + 1)

    gi = np.asarray(index, dtype=np.int64)
    changed = np.nonzero(gi != mirror[:n, _COL_GROUP])[0]
    if changed.size:
        mirror[changed, _COL_GROUP] = gi[changed]
        lo, hi = min(lo, int(changed[0])), max(hi, int(changed[-1]) + 1)
    rows = _group_rows(groups, device)
    changed = np.nonzero((rows != mirror[n:]).any(axis=1))[0]
    if changed.size:
        mirror[n + changed] = rows[changed]
        lo, hi = min(lo, n + int(changed[0])), max(hi, n + int(changed[-1]) + 1)

    if cap:
        t = CACHE.graph_copy(t, mirror) if hi > lo else t
        CACHE.freeze(t)
    else:
        CACHE.upload(t, lo, hi)
        t.sources = sources
        CACHE.prepare_graph_staging(t)

    if grad_scale is None or found_inf is None:
        d_scale, d_inf = CACHE.defaults(device)
        grad_scale = d_scale if grad_scale is None else grad_scale
        found_inf = d_inf if found_inf is None else found_inf
    if grad_scale.dtype != torch.float32:
        grad_scale = grad_scale.float()
    if found_inf.dtype != torch.float32:
        found_inf = found_inf.float()

    buf = t.buf
    groups_buf = buf[n:]
    CACHE.stats["launches"] += 1
    _smes_scalars_kernel[(triton.cdiv(n, block_t),)](
        buf, groups_buf, groups_buf.view(torch.float64), t.scal, found_inf, n, BLOCK_T=block_t
    )
    if t.n_blocks == 0:  # only zero-size tensors: their step counts advance, nothing else
        return
    consts = dict(
        PARAM_DTYPE=TORCH_TO_TL[pdt],
        STATE_DTYPE=TORCH_TO_TL[sdt],
        P_CLASS=int(variant.p_class),
        TRACK_V=bool(track_v),
        DECOUPLED=bool(variant.decoupled),
        AMSGRAD=bool(amsgrad),
        MAXIMIZE=bool(variant.maximize),
        BLOCK_SIZE=block_size,
        STOCHASTIC=bool(variant.stochastic_rounding) and pdt == torch.bfloat16,
    )
    ptrs = dict(addr=buf, scal=t.scal, block_map=t.block_map, grad_scale=grad_scale,
                found_inf=found_inf)  # fmt: skip
    for hook in LAUNCH_HOOKS:
        hook(consts, t.n_blocks, ptrs)
    args = (buf, t.scal, t.block_map, grad_scale, found_inf)
    if not variant.projection:
        CACHE.stats["launches"] += 1
        _smes_step_kernel[(t.n_blocks,)](*args, t.scal, num_warps=num_warps, **consts)
        return
    # The projection (SPEC §4): moments and row sums, the decision per tensor, the update.
    CACHE.stats["launches"] += 3
    _smes_step_kernel[(t.n_blocks,)](*args, t.row_stats, num_warps=num_warps, PHASE=1, **consts)
    _smes_decide_kernel[(n,)](buf, t.scal, t.row_stats, t.row_k, BLOCK_R=128)
    _smes_step_kernel[(t.n_blocks,)](*args, t.row_k, num_warps=num_warps, PHASE=2, **consts)


__all__ = ["CACHE", "LAUNCH_HOOKS", "LAUNCHES_PER_STEP", "GroupHyper", "smes_step", "step_groups",
           "smes_tables", "launch_config"]  # fmt: skip
