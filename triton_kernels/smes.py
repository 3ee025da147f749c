"""The SMES step as one multi-tensor Triton kernel, and its host wrapper.

SMES is Adam whose denominator is ``v̂^p + eps`` for a real exponent ``p`` (SPEC §1):

    g ← −g (maximize);  g ← g / grad_scale;  g ← g + λθ (L2)  or  θ ← θ(1 − ηλ) (decoupled)
    m ← β1·m + (1 − β1)·g
    v ← β2·v + (1 − β2)·g²;  v_max ← max(v_max, v) (amsgrad, then v̂ uses v_max)
    bc1 = 1 − β1^t, bc2 = 1 − β2^t     (float64; both 1 without bias correction)
    D = 1 + ε                     p = 0
    D = sqrt(v)/sqrt(bc2) + ε     p = 0.5   (torch.optim.AdamW's order)
    D = exp2(p·log2(v/bc2)) + ε   otherwise (v̂ = 0, p < 0: D = inf, the update is exactly 0)
    θ ← θ − (η/bc1)·m/D

One launch applies the rule to every tensor of a bucket (all param groups). The kernel reaches
the tensors through device tables (the layout is in :class:`_Tables`):

- ``addr``  int64 ``[n_tensors, 8]``: addresses of param, grad, exp_avg, exp_avg_sq,
  max_exp_avg_sq, step (float32 scalar), lr (float32 scalar), then ``n_elements``;
- ``hyper`` float64 ``[n_tensors, 8]`` (same storage as ``addr``, the next 64 bytes of each row):
  beta1, beta2, eps, exponent, weight_decay, bias_correction (1/0), a float32 lr slot (the lr
  address points there unless lr is a device tensor), padding;
- ``block_map`` int32 ``[n_blocks, 2]``: (tensor index, block index inside the tensor). Program
  ``pid`` handles elements ``[b·BLOCK_SIZE, (b+1)·BLOCK_SIZE)`` of tensor ``i``; the block base is
  formed in int64 (tensors beyond 2^31 elements), offsets inside a block are int32.

Everything that changes between steps (lr, betas, eps, exponent, weight decay, step, grad
addresses) is data, never a kernel argument or a constexpr, so it never recompiles. The
compile-time switches are the exponent class, track_v, the weight-decay mode, amsgrad, maximize
and the dtypes. ``grad_scale`` and ``found_inf`` are read through pointers in the kernel (a
persistent ``[1.0, 0.0]`` buffer stands in when absent), so nothing syncs with the host.

Reference: the Adam/AdamW update of torch.optim.AdamW and apex's multi_tensor_adam.cu (tensor
lists reached through address tables, a block → (tensor, chunk) map, a runtime alignment check).
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import triton
import triton.language as tl
from triton import knobs

# The mode the @triton.jit functions below were created in (Triton decides at decoration time):
# True when TRITON_INTERPRET=1 was in effect at import, so the kernels run on CPU tensors.
INTERPRET = bool(knobs.runtime.interpret)

# Exponent classes (the same values as smes_fused._bucket.P_*).
P_ZERO = 0
P_HALF = 1
P_GENERAL = 2

# Table layout (columns of one row).
ADDR_COLS = 8  # param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, n_elements
HYPER_COLS = 8  # beta1, beta2, eps, exponent, weight_decay, bias_correction, lr slot, pad
ROW = ADDR_COLS + HYPER_COLS  # 16 x 8 bytes per tensor
LR_SLOT = ADDR_COLS + 6  # the 64-bit cell whose low float32 half holds a host lr

TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# Triton's interpreter converts float32 → bfloat16 by truncation; the GPU rounds to nearest even.
# The interpreter build rounds by hand so the CPU tests see what the GPU computes.
_BF16_RTNE_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def _to_storage(x, DTYPE: tl.constexpr):
    """float32 → storage dtype, rounded to nearest even."""
    if _BF16_RTNE_BY_HAND and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)  # NaN stays NaN
    else:
        return x.to(DTYPE)


@triton.jit
def _smes_math(
    theta,
    g,
    m,
    v,
    vmax,
    inv_scale,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    exponent,
    weight_decay,
    decay,
    step_size,
    bc2,
    bc2_sqrt,
    P_CLASS: tl.constexpr,
    TRACK_V: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
):
    """The per-element SMES rule (SPEC §1) in float32; every backend's math, written once here.

    Inputs are float32 blocks (``v``/``vmax`` unused when not tracked) and float32 scalars
    precomputed per tensor: ``decay = 1 − η·λ``, ``step_size = η/bc1``, ``bc2``,
    ``bc2_sqrt = sqrt(bc2)``. Returns the new ``(theta, m, v, vmax)``.
    """
    if MAXIMIZE:  # compile-time: removes the negation
        g = -g
    g = g * inv_scale  # 1/grad_scale, exactly 1.0 when no scaler is used
    if DECOUPLED:  # compile-time: AdamW decay on θ, else L2 added to the gradient
        theta = theta * decay  # decay == 1 exactly when λ == 0
    else:
        g = tl.where(weight_decay != 0.0, g + weight_decay * theta, g)
    m = beta1 * m + one_minus_beta1 * g
    if TRACK_V:  # compile-time: removes v's load, update and store (SGD memory at p = 0)
        v = beta2 * v + one_minus_beta2 * g * g
        if AMSGRAD:  # compile-time: removes v_max's load, max and store
            vmax = tl.maximum(vmax, v)
            vhat = vmax
        else:
            vhat = v
    if P_CLASS == 0:  # compile-time p = 0: no denominator math at all
        update = m / (1.0 + eps)
    elif P_CLASS == 1:  # compile-time p = 0.5: AdamW's sqrt(v)/sqrt(bc2) + eps, rounded as torch
        denom = tl.div_rn(tl.sqrt_rn(vhat), bc2_sqrt) + eps
        update = tl.div_rn(m, denom)
    else:  # general p: v̂^p = exp2(p·log2 v̂); v̂ = 0 and p < 0 give inf, so the update is 0
        vh = tl.div_rn(vhat, bc2)
        denom = tl.exp2(exponent * tl.log2(vh)) + eps
        update = tl.div_rn(m, denom)
    theta = theta - step_size * update
    return theta, m, v, vmax


@triton.jit
def _smes_block(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    offs,
    mask,
    inv_scale,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    exponent,
    weight_decay,
    decay,
    step_size,
    bc2,
    bc2_sqrt,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    P_CLASS: tl.constexpr,
    TRACK_V: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
):
    """Load one block (storage dtype → float32), apply :func:`_smes_math`, store it back."""
    theta = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = m  # placeholders with the right type when v / v_max are not tracked
    vmax = m
    if TRACK_V:
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        if AMSGRAD:
            vmax = tl.load(vmax_ptr + offs, mask=mask).to(tl.float32)
    theta, m, v, vmax = _smes_math(
        theta,
        g,
        m,
        v,
        vmax,
        inv_scale,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        eps,
        exponent,
        weight_decay,
        decay,
        step_size,
        bc2,
        bc2_sqrt,
        P_CLASS,
        TRACK_V,
        DECOUPLED,
        AMSGRAD,
        MAXIMIZE,
    )
    tl.store(p_ptr + offs, _to_storage(theta, PARAM_DTYPE), mask=mask)
    tl.store(m_ptr + offs, _to_storage(m, STATE_DTYPE), mask=mask)
    if TRACK_V:
        tl.store(v_ptr + offs, _to_storage(v, STATE_DTYPE), mask=mask)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, _to_storage(vmax, STATE_DTYPE), mask=mask)


@triton.jit
def _smes_step_kernel(
    addr_ptr,
    hyper_ptr,
    block_map_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    PARAM_DTYPE: tl.constexpr,  # storage dtype of params and grads (fp32 / bf16 / fp16)
    STATE_DTYPE: tl.constexpr,  # storage dtype of exp_avg / exp_avg_sq / max_exp_avg_sq
    P_CLASS: tl.constexpr,  # 0: p = 0 (no denominator math), 1: p = 0.5 (sqrt), 2: general pow
    TRACK_V: tl.constexpr,  # False removes every access to v (and v_max)
    DECOUPLED: tl.constexpr,  # True: AdamW decay of θ; False: L2 term in the gradient
    AMSGRAD: tl.constexpr,  # False removes v_max's load, max and store
    MAXIMIZE: tl.constexpr,  # False removes the gradient negation
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    """One SMES step over every tensor of a bucket; program ``pid`` updates one block.

    The block map gives (tensor ``i``, block ``b``); row ``i`` of the tables gives the tensor's
    addresses, ``n_elements`` and hyperparameters. Bias corrections are formed here, in float64,
    from the device step count: ``bc = 1 − exp2(t·log2 β)``. When ``*found_inf_ptr != 0`` every
    load and store is masked off, so nothing changes and the host never syncs.
    """
    pid = tl.program_id(0)
    tensor = tl.load(block_map_ptr + 2 * pid).to(tl.int64)
    block = tl.load(block_map_ptr + 2 * pid + 1).to(tl.int64)
    row = addr_ptr + tensor * 16
    hrow = hyper_ptr + tensor * 16 + 8
    n_elements = tl.load(row + 7)
    start = block * BLOCK_SIZE  # int64: tensors may exceed 2^31 elements
    # Offsets inside the block are int32: fewer registers than int64 addressing.
    offs = tl.arange(0, BLOCK_SIZE)
    found_inf = tl.load(found_inf_ptr)
    limit = tl.minimum(n_elements - start, BLOCK_SIZE).to(tl.int32)
    limit = tl.where(found_inf == 0.0, limit, 0)
    mask = offs < limit
    inv_scale = 1.0 / tl.load(grad_scale_ptr).to(tl.float32)

    # Per-tensor scalars, in float64 where SPEC §1 asks for it (bias corrections).
    beta1 = tl.load(hrow + 0)
    beta2 = tl.load(hrow + 1)
    eps = tl.load(hrow + 2)
    exponent = tl.load(hrow + 3)
    weight_decay = tl.load(hrow + 4)
    bias_correction = tl.load(hrow + 5)
    step = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32))).to(tl.float64)
    lr = tl.load(tl.load(row + 6).to(tl.pointer_type(tl.float32))).to(tl.float64)
    bc1 = tl.where(bias_correction != 0.0, 1.0 - tl.exp2(step * tl.log2(beta1)), 1.0)
    bc2 = tl.where(bias_correction != 0.0, 1.0 - tl.exp2(step * tl.log2(beta2)), 1.0)
    step_size = (lr / bc1).to(tl.float32)
    decay = (1.0 - lr * weight_decay).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)

    p_addr = tl.load(row + 0)
    g_addr = tl.load(row + 1)
    m_addr = tl.load(row + 2)
    v_addr = tl.load(row + 3)
    vmax_addr = tl.load(row + 4)
    # Runtime fast-path check (apex's ILP test): a full block whose addresses are all 16-byte
    # aligned is loaded and stored unmasked with an alignment hint, so it vectorises to 128 bits;
    # the tail block, misaligned views and found_inf (limit 0) take the masked path.
    any_addr = p_addr | g_addr | m_addr
    if TRACK_V:
        any_addr = any_addr | v_addr
        if AMSGRAD:
            any_addr = any_addr | vmax_addr
    p_esize: tl.constexpr = PARAM_DTYPE.primitive_bitwidth // 8
    s_esize: tl.constexpr = STATE_DTYPE.primitive_bitwidth // 8
    p_addr += start * p_esize
    g_addr += start * p_esize
    m_addr += start * s_esize
    v_addr += start * s_esize
    vmax_addr += start * s_esize
    # Both branches are the same code; the hints only survive inside a branch, so each calls the
    # block helper. Per-tensor scalars are float32 from here on.
    beta1_f = beta1.to(tl.float32)
    omb1 = (1.0 - beta1).to(tl.float32)
    beta2_f = beta2.to(tl.float32)
    omb2 = (1.0 - beta2).to(tl.float32)
    eps_f = eps.to(tl.float32)
    exponent_f = exponent.to(tl.float32)
    wd_f = weight_decay.to(tl.float32)
    bc2_f = bc2.to(tl.float32)
    if ((any_addr % 16) == 0) & (limit == BLOCK_SIZE):
        _smes_block(
            tl.multiple_of(p_addr.to(tl.pointer_type(PARAM_DTYPE)), 16),
            tl.multiple_of(g_addr.to(tl.pointer_type(PARAM_DTYPE)), 16),
            tl.multiple_of(m_addr.to(tl.pointer_type(STATE_DTYPE)), 16),
            tl.multiple_of(v_addr.to(tl.pointer_type(STATE_DTYPE)), 16),
            tl.multiple_of(vmax_addr.to(tl.pointer_type(STATE_DTYPE)), 16),
            offs,
            None,
            inv_scale,
            beta1_f,
            omb1,
            beta2_f,
            omb2,
            eps_f,
            exponent_f,
            wd_f,
            decay,
            step_size,
            bc2_f,
            bc2_sqrt,
            PARAM_DTYPE,
            STATE_DTYPE,
            P_CLASS,
            TRACK_V,
            DECOUPLED,
            AMSGRAD,
            MAXIMIZE,
        )
    else:
        _smes_block(
            p_addr.to(tl.pointer_type(PARAM_DTYPE)),
            g_addr.to(tl.pointer_type(PARAM_DTYPE)),
            m_addr.to(tl.pointer_type(STATE_DTYPE)),
            v_addr.to(tl.pointer_type(STATE_DTYPE)),
            vmax_addr.to(tl.pointer_type(STATE_DTYPE)),
            offs,
            mask,
            inv_scale,
            beta1_f,
            omb1,
            beta2_f,
            omb2,
            eps_f,
            exponent_f,
            wd_f,
            decay,
            step_size,
            bc2_f,
            bc2_sqrt,
            PARAM_DTYPE,
            STATE_DTYPE,
            P_CLASS,
            TRACK_V,
            DECOUPLED,
            AMSGRAD,
            MAXIMIZE,
        )


# ----------------------------------------------------------------------------------------------
# Host side: the table cache and the launch.


def launch_config(device: torch.device) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps). On a GPU 1024 elements over 8 warps: 4 per thread, one 128-bit
    access per fp32 tensor and 48-64 registers (2048/8 costs 63-116). The interpreter runs one
    Python loop iteration per program, so it gets larger blocks."""
    if INTERPRET:
        return 4096, 1
    return 1024, 8


@dataclasses.dataclass
class _Tables:
    """Device tables of one (tensor list, variant): built once, re-uploaded in place on change.

    ``buf`` is one int64 ``[n, 16]`` device tensor; columns 0-7 are the address table, 8-15 the
    float64 hyperparameters (``buf.view(torch.float64)``). ``block_map`` is int32 ``[n_blocks, 2]``.
    Uploads go through a ring of pinned host buffers, each reused only once the copy that read
    it has finished (an event), so a host-side rewrite never races an in-flight copy.
    """

    buf: torch.Tensor
    block_map: torch.Tensor
    n_blocks: int
    host: list  # staging buffers (CPU: the device buffer itself)
    events: list
    slot: int = 0
    row_key: tuple | None = None
    lr_copies: tuple = ()  # (slot index into buf.view(float32), lr tensor): device-side lr casts


class TableCache:
    """Tables per (device, dtypes, variant, param storages), LRU-bounded.

    Keyed by ``data_ptr`` (never ``id``): a parameter list with the same storages reuses its
    buffers; grads that were set to None and reallocated, new step tensors or changed
    hyperparameters only re-upload the rows (no allocation, no recompilation).
    """

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.stats = collections.Counter()  # "builds", "uploads", "launches"
        self._defaults: dict = {}

    def defaults(self, device: torch.device) -> torch.Tensor:
        """A persistent [grad_scale = 1, found_inf = 0] float32 buffer per device."""
        t = self._defaults.get(device)
        if t is None:
            t = torch.tensor([1.0, 0.0], dtype=torch.float32, device=device)
            self._defaults[device] = t
        return t

    def get(self, key, numels: list[int], device: torch.device, block_size: int) -> _Tables:
        t = self.entries.get(key)
        if t is not None:
            self.entries.move_to_end(key)
            return t
        self.stats["builds"] += 1
        n = len(numels)
        blocks = [(i, b) for i, ne in enumerate(numels) for b in range(triton.cdiv(ne, block_size))]
        block_map = torch.tensor(blocks, dtype=torch.int32).reshape(-1, 2).to(device)
        buf = torch.zeros((n, ROW), dtype=torch.int64, device=device)
        if device.type == "cpu":
            host, events = [buf], [None]
        else:
            host = [torch.zeros((n, ROW), dtype=torch.int64, pin_memory=True) for _ in range(4)]
            events = [None] * 4
        t = _Tables(buf, block_map, len(blocks), host, events)
        self.entries[key] = t
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return t

    def upload(self, t: _Tables, addr_rows: list, hyper_rows: list, lrs: list) -> None:
        """Write the rows into a staging buffer; copy it to the device buffer, stream-ordered."""
        self.stats["uploads"] += 1
        device = t.buf.device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "smes_fused triton backend: the tensor tables or hyperparameters changed while a "
                "CUDA graph was being captured; run a few steps before capturing and keep "
                "float hyperparameters fixed inside the graph (use a tensor lr)"
            )
        slot = t.slot
        t.slot = (slot + 1) % len(t.host)
        host = t.host[slot]
        ev = t.events[slot]
        if ev is not None:
            ev.synchronize()  # only waits if the GPU is len(host) uploads behind
        n = host.shape[0]
        host[:, :ADDR_COLS] = torch.tensor(addr_rows, dtype=torch.int64).reshape(n, ADDR_COLS)
        hv = host.view(torch.float64)
        hv[:, ADDR_COLS : ADDR_COLS + 6] = torch.tensor(hyper_rows, dtype=torch.float64).reshape(
            n, 6
        )
        host.view(torch.float32)[:, 2 * LR_SLOT] = torch.tensor(lrs, dtype=torch.float32)
        if host is not t.buf:
            t.buf.copy_(host, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            t.events[slot] = ev


CACHE = TableCache()

# Test hooks: each is called as hook(constexprs: dict, n_blocks: int) before a launch.
LAUNCH_HOOKS: list = []


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
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """Apply one SMES step to the listed tensors (one compile-time ``variant``) in one launch.

    ``hypers[i]`` has ``lr`` (float or tensor), ``beta1``, ``beta2``, ``eps``, ``exponent``,
    ``weight_decay`` and ``bias_correction``; ``variant`` has ``p_class``, ``track_v``,
    ``decoupled``, ``amsgrad`` and ``maximize``. ``steps`` are float32 device scalars already
    incremented for this step. ``grad_scale`` / ``found_inf``: float32 device scalars or None.
    """
    keep = [i for i, p in enumerate(params) if p.numel() > 0]  # zero-size params: no-ops
    if not keep:
        return
    p0 = params[keep[0]]
    device = p0.device
    pdt = p0.dtype
    sdt = exp_avgs[keep[0]].dtype
    block_size, num_warps = launch_config(device)
    numels = [params[i].numel() for i in keep]
    key = (
        device,
        pdt,
        sdt,
        tuple(variant),
        block_size,
        tuple(params[i].data_ptr() for i in keep),
        tuple(numels),
    )
    t = CACHE.get(key, numels, device, block_size)

    # Rows: addresses and hyperparameters; re-uploaded only when one of them changed.
    base = t.buf.data_ptr()
    track_v = variant.track_v
    amsgrad = variant.amsgrad
    addr_rows: list = []
    hyper_rows: list = []
    lrs: list = []
    lr_copies: list = []
    for r, i in enumerate(keep):
        h = hypers[i]
        lr = h.lr
        lr_addr = base + (r * ROW + LR_SLOT) * 8  # the row's own float32 slot
        if isinstance(lr, torch.Tensor):
            if lr.device == device and lr.dtype == torch.float32:
                lr_addr, lr = lr.data_ptr(), 0.0  # capturable: read in the kernel
            elif lr.device.type == "cpu":
                lr = float(lr)
            else:  # a device lr of another dtype: cast into the slot on the device each step
                lr_copies.append((r * ROW * 2 + 2 * LR_SLOT, lr))
                lr = 0.0
        v = exp_avg_sqs[i] if track_v else None
        vm = max_exp_avg_sqs[i] if amsgrad else None
        addr_rows += (
            params[i].data_ptr(),
            grads[i].data_ptr(),
            exp_avgs[i].data_ptr(),
            0 if v is None else v.data_ptr(),
            0 if vm is None else vm.data_ptr(),
            steps[i].data_ptr(),
            lr_addr,
            numels[r],
        )
        hyper_rows += (
            h.beta1,
            h.beta2,
            h.eps,
            h.exponent,
            h.weight_decay,
            1.0 if h.bias_correction else 0.0,
        )
        lrs.append(lr)
    row_key = (tuple(addr_rows), tuple(hyper_rows), tuple(lrs))
    if row_key != t.row_key:
        _check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, keep, variant)
        CACHE.upload(t, addr_rows, hyper_rows, lrs)
        t.row_key = row_key
    if lr_copies:
        flat = t.buf.view(torch.float32).view(-1)
        for slot, lr in lr_copies:
            flat[slot].copy_(lr)

    if grad_scale is None or found_inf is None:
        d = CACHE.defaults(device)
        grad_scale = d[0:1] if grad_scale is None else grad_scale
        found_inf = d[1:2] if found_inf is None else found_inf
    consts = dict(
        PARAM_DTYPE=TORCH_TO_TL[pdt],
        STATE_DTYPE=TORCH_TO_TL[sdt],
        P_CLASS=int(variant.p_class),
        TRACK_V=bool(track_v),
        DECOUPLED=bool(variant.decoupled),
        AMSGRAD=bool(amsgrad),
        MAXIMIZE=bool(variant.maximize),
        BLOCK_SIZE=block_size,
    )
    for hook in LAUNCH_HOOKS:
        hook(consts, t.n_blocks)
    CACHE.stats["launches"] += 1
    _smes_step_kernel[(t.n_blocks,)](
        t.buf,
        t.buf.view(torch.float64),
        t.block_map,
        grad_scale.float() if grad_scale.dtype != torch.float32 else grad_scale,
        found_inf.float() if found_inf.dtype != torch.float32 else found_inf,
        num_warps=num_warps,
        **consts,
    )


def _check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, keep, variant) -> None:
    """What the kernel assumes of the tensors; checked only when the tables are (re)built."""
    device = params[keep[0]].device
    pdt, sdt = params[keep[0]].dtype, exp_avgs[keep[0]].dtype
    for i in keep:
        p = params[i]
        ts = [(p, pdt), (grads[i], pdt), (exp_avgs[i], sdt)]
        if variant.track_v:
            ts.append((exp_avg_sqs[i], sdt))
        if variant.amsgrad:
            ts.append((max_exp_avg_sqs[i], sdt))
        for x, dt in ts:
            if x.device != device or x.dtype != dt or x.numel() != p.numel():
                raise RuntimeError(
                    f"smes_fused triton backend: tensor of {x.dtype}/{x.device}/{x.numel()} "
                    f"elements where {dt}/{device}/{p.numel()} was expected"
                )
            dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
            if not dense or x.stride() != p.stride():
                raise RuntimeError(
                    "smes_fused triton backend: each tensor must be dense (contiguous or "
                    "channels_last) with its parameter's strides"
                )
        s = steps[i]
        if s.device != device or s.dtype != torch.float32:
            raise RuntimeError(
                f"smes_fused triton backend: step must be a float32 tensor on {device}, "
                f"got {s.dtype} on {s.device}"
            )
