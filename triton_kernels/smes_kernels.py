"""The SMES step as two Triton kernels: a per-tensor prologue and the multi-tensor element loop.

SMES is Adam whose denominator is ``v̂^p + eps`` for a real exponent ``p`` (SPEC §1):

    g ← −g (maximize);  g ← g / grad_scale;  g ← g + λθ (L2)  or  θ ← θ(1 − ηλ) (decoupled)
    m ← β1·m + (1 − β1)·g
    v ← β2·v + (1 − β2)·g²;  v_max ← max(v_max, v) (amsgrad, then v̂ uses v_max)
    bc1 = 1 − β1^t, bc2 = 1 − β2^t     (float64; both 1 without bias correction)
    D = 1 + ε                     p = 0
    D = sqrt(v)/sqrt(bc2) + ε     p = 0.5   (torch.optim.AdamW's order)
    D = exp2(p·log2(v/bc2)) + ε   otherwise (v̂ = 0, p < 0: D = inf, the update is exactly 0)
    θ ← θ − (η/bc1)·m/D

A step is two launches, whatever the number of tensors and param groups:

1. :func:`_smes_scalars_kernel`, one lane per tensor: advances the tensor's step count (unless
   ``found_inf`` is set: torch's fused protocol, no host sync), reads its group's lr (a host
   value or a device tensor of any float dtype) and computes the bias corrections in float64
   once, writing the float32 per-tensor scalars of this step into the ``scal`` table;
2. :func:`_smes_step_kernel`, one program per block of ``BLOCK_SIZE`` elements: reads the
   scalars of its tensor (float32 only: no FP64 in the element loop) and applies the rule.

The tables (layout in ``smes_tables``) are one int64 device buffer: a row of 8 words per tensor
(addresses, ``n_elements``, group index), then a row per param group (hyperparameters, the lr
source). Everything that changes between steps is data, never a constexpr, so nothing
recompiles; the compile-time switches are the exponent class, track_v, the weight-decay mode,
amsgrad, maximize and the dtypes.

Reference: torch.optim.AdamW's update, apex's multi_tensor_adam.cu (tensor lists through address
tables, a block → (tensor, chunk) map, a runtime alignment check).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpret_mode() -> bool:
    """Whether Triton's interpreter is in effect. ``triton.knobs`` exists from Triton 3.4; older
    Tritons read the environment variable directly, as this does."""
    try:
        from triton import knobs
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return bool(knobs.runtime.interpret)


# The mode the @triton.jit functions below were created in (Triton decides at decoration time):
# True when TRITON_INTERPRET=1 was in effect at import, so the kernels run on CPU tensors.
INTERPRET = interpret_mode()

# Exponent classes (the same values as smes_fused._bucket.P_*).
P_ZERO = 0
P_HALF = 1
P_GENERAL = 2

# Table layout (tl.constexpr, so the kernels can read them; int() gives the host value): one row of
# 10 words per tensor, then one per param group.
_c = tl.constexpr
ROW = _c(11)
COL_P, COL_G, COL_M, COL_V, COL_VMAX, COL_STEP, COL_NUMEL, COL_GROUP = (_c(i) for i in range(8))
# Projection (SPEC §4): the tensor's rows (its size(0) when dim > 1, else 1) and its first row in
# the bucket's row buffers.
COL_NROWS, COL_ROW0 = _c(8), _c(9)
# Group row: float64 beta1, beta2, eps, exponent, weight_decay; int64 flags; float64 lr; int64
# lr address (a device tensor lr, read every step) or 0; float64 projection_delta and
# projection_wd_ratio.
GCOL_BETA1, GCOL_BETA2, GCOL_EPS, GCOL_EXP, GCOL_WD, GCOL_FLAGS, GCOL_LR, GCOL_LR_ADDR = (
    _c(i) for i in range(8)
)
GCOL_DELTA, GCOL_WD_RATIO, GCOL_SEED = _c(8), _c(9), _c(10)
FLAG_BIAS_CORRECTION = _c(1)
LR_SHIFT = _c(1)  # (flags >> LR_SHIFT) & LR_MASK: where the lr is read (LR_*)
LR_MASK = _c(7)
LR_HOST, LR_F32, LR_F64, LR_BF16, LR_F16 = (_c(i) for i in range(5))
FLAG_RECTIFY = _c(16)  # RAdam's rectification (SPEC §4)
FLAG_SUM_V = _c(32)  # AdaGrad: v ← v + g², no bc2
FLAG_SR = _c(64)  # stochastic rounding of θ (bf16 params; smes_fused/_rounding.py)
# Per-tensor float32 scalars of one step (written by the prologue, read by every block).
SCAL_COLS = _c(16)
# S_EPS: the group's eps (the projection's); S_EPS_D: the update direction's, eps / bc2^p on
# rectified adaptive steps (SPEC §4)
(S_STEP_SIZE, S_DECAY, S_BC2, S_BC2_SQRT, S_BETA1, S_OMB1, S_BETA2, S_OMB2, S_EPS, S_EXP,
 S_WD, S_ADAPT, S_DECAY_PROJ, S_DELTA, S_KEY, S_EPS_D) = (_c(i) for i in range(16))  # fmt: skip
M32 = _c(0xFFFFFFFF)

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
def _mix(x):
    """MurmurHash3's fmix32 on int64 values holding uint32 (smes_fused/_rounding.py)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


@triton.jit
def _to_bf16_stochastic(x, key, index):
    """float32 → bfloat16, rounded up with probability (low 16 bits)/2^16: unbiased, the
    random bits a hash of (key, element index) as in smes_fused/_rounding.py; non-finite values
    to nearest."""
    r = _mix(key ^ (index & M32) ^ _mix(index >> 32)) & 0xFFFF
    bits = x.to(tl.uint32, bitcast=True).to(tl.int64) & M32
    up = (((bits + r) >> 16) & 0xFFFF).to(tl.uint16)
    rounded = up.to(tl.bfloat16, bitcast=True)
    finite = (x == x) & (tl.abs(x) < float("inf"))
    return tl.where(finite, rounded, _to_storage(x, tl.bfloat16))


@triton.jit
def _load_lr(gi_ptr, gf_ptr, code, mask):
    """A group's lr as float64: the host value, or a device tensor read through its address."""
    lr = tl.load(gf_ptr + GCOL_LR, mask=mask, other=0.0)
    addr = tl.load(gi_ptr + GCOL_LR_ADDR, mask=mask, other=0)
    m = mask & (code == LR_F32)
    x = tl.load(addr.to(tl.pointer_type(tl.float32)), mask=m, other=0.0)
    lr = tl.where(m, x.to(tl.float64), lr)
    m = mask & (code == LR_F64)
    x = tl.load(addr.to(tl.pointer_type(tl.float64)), mask=m, other=0.0)
    lr = tl.where(m, x, lr)
    m = mask & (code == LR_BF16)
    x = tl.load(addr.to(tl.pointer_type(tl.bfloat16)), mask=m, other=0.0)
    lr = tl.where(m, x.to(tl.float64), lr)
    m = mask & (code == LR_F16)
    x = tl.load(addr.to(tl.pointer_type(tl.float16)), mask=m, other=0.0)
    lr = tl.where(m, x.to(tl.float64), lr)
    return lr


@triton.jit(do_not_specialize=["n_tensors"])
def _smes_scalars_kernel(
    addr_ptr,
    group_ptr,
    group_f_ptr,
    scal_ptr,
    found_inf_ptr,
    n_tensors,
    BLOCK_T: tl.constexpr,  # tensors per program
):
    """Per tensor: advance the step count (unless found_inf), and write this step's float32
    scalars ``step_size = η/bc1``, ``decay = 1 − ηλ``, ``bc2``, ``sqrt(bc2)``, β1, 1 − β1, β2,
    1 − β2, ε, p, λ, with the bias corrections ``bc = 1 − exp2(t·log2 β)`` in float64."""
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = i < n_tensors
    row = addr_ptr + i.to(tl.int64) * ROW
    step_addr = tl.load(row + COL_STEP, mask=mask, other=0)
    group = tl.load(row + COL_GROUP, mask=mask, other=0)
    gi_ptr = group_ptr + group * ROW
    gf_ptr = group_f_ptr + group * ROW
    beta1 = tl.load(gf_ptr + GCOL_BETA1, mask=mask, other=0.0)
    beta2 = tl.load(gf_ptr + GCOL_BETA2, mask=mask, other=0.0)
    eps = tl.load(gf_ptr + GCOL_EPS, mask=mask, other=0.0)
    exponent = tl.load(gf_ptr + GCOL_EXP, mask=mask, other=0.0)
    weight_decay = tl.load(gf_ptr + GCOL_WD, mask=mask, other=0.0)
    flags = tl.load(gi_ptr + GCOL_FLAGS, mask=mask, other=0)
    lr = _load_lr(gi_ptr, gf_ptr, (flags >> LR_SHIFT) & LR_MASK, mask)
    wd_ratio = tl.load(gf_ptr + GCOL_WD_RATIO, mask=mask, other=1.0)
    seed = tl.load(gi_ptr + GCOL_SEED, mask=mask, other=0)
    delta = tl.load(gf_ptr + GCOL_DELTA, mask=mask, other=0.0)

    # The step count, advanced here (float32, as torch's _foreach_add_) unless found_inf is set.
    step_ptr = step_addr.to(tl.pointer_type(tl.float32))
    old_step = tl.load(step_ptr, mask=mask, other=0.0)
    step = old_step + 1.0
    found_inf = tl.load(found_inf_ptr)
    tl.store(step_ptr, tl.where(found_inf == 0.0, step, old_step), mask=mask)

    t = step.to(tl.float64)
    bc_on = (flags & FLAG_BIAS_CORRECTION) != 0
    sum_v = (flags & FLAG_SUM_V) != 0
    b2t = tl.exp2(t * tl.log2(beta2))
    bc1 = tl.where(bc_on, 1.0 - tl.exp2(t * tl.log2(beta1)), 1.0)
    bc2 = tl.where(bc_on & (sum_v == 0), 1.0 - b2t, 1.0)
    # RAdam (SPEC §4): while rho_t <= 5 the step is u = m-hat, then times r_t.
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * b2t / (1.0 - b2t)
    rect_on = ((flags & FLAG_RECTIFY) != 0) & (exponent != 0.0)
    adaptive = (rect_on == 0) | (rho_t > 5.0)
    rho_s = tl.where(rho_t > 5.0, rho_t, 6.0)
    r_num = (rho_s - 4.0) * (rho_s - 2.0) * rho_inf
    r_t = tl.sqrt(r_num / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_s))
    step_size = tl.where(rect_on & adaptive, lr / bc1 * r_t, lr / bc1)
    out = scal_ptr + i.to(tl.int64) * SCAL_COLS
    tl.store(out + S_STEP_SIZE, step_size.to(tl.float32), mask=mask)
    tl.store(out + S_DECAY, (1.0 - lr * weight_decay).to(tl.float32), mask=mask)
    tl.store(out + S_DECAY_PROJ, (1.0 - lr * weight_decay * wd_ratio).to(tl.float32), mask=mask)
    tl.store(out + S_DELTA, delta.to(tl.float32), mask=mask)
    # The stochastic rounding's key of this step (a uint32 in a float32 column, bit for bit).
    key = _mix(seed ^ _mix((step.to(tl.int64) * 0x9E3779B9) & M32))
    tl.store(out + S_KEY, key.to(tl.uint32).to(tl.float32, bitcast=True), mask=mask)
    tl.store(out + S_ADAPT, tl.where(adaptive, 1.0, 0.0).to(tl.float32), mask=mask)
    tl.store(out + S_BC2, bc2.to(tl.float32), mask=mask)
    tl.store(out + S_BC2_SQRT, tl.sqrt(bc2).to(tl.float32), mask=mask)
    tl.store(out + S_BETA1, beta1.to(tl.float32), mask=mask)
    tl.store(out + S_OMB1, (1.0 - beta1).to(tl.float32), mask=mask)
    tl.store(out + S_BETA2, tl.where(sum_v, 1.0, beta2).to(tl.float32), mask=mask)
    tl.store(out + S_OMB2, tl.where(sum_v, 1.0, 1.0 - beta2).to(tl.float32), mask=mask)
    # rectified adaptive steps: torch's RAdam adds eps before the bias correction, eps / bc2^p
    eps_r = eps / tl.exp2(exponent * tl.log2(bc2))
    tl.store(out + S_EPS, eps.to(tl.float32), mask=mask)
    tl.store(out + S_EPS_D, tl.where(rect_on & adaptive, eps_r, eps).to(tl.float32), mask=mask)
    tl.store(out + S_EXP, exponent.to(tl.float32), mask=mask)
    tl.store(out + S_WD, weight_decay.to(tl.float32), mask=mask)


@triton.jit
def _smes_moments(
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
    weight_decay,
    TRACK_V: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
):
    """The moments of SPEC §1: returns ``(g_cos, m, v, vmax, vhat)`` where ``g_cos`` is the
    gradient after maximize and 1/grad_scale, before L2 (what the projection's cosine reads)."""
    if MAXIMIZE:  # compile-time: removes the negation
        g = -g
    g = g * inv_scale  # 1/grad_scale, exactly 1.0 when no scaler is used
    g_cos = g
    if not DECOUPLED:  # compile-time: L2 added to the gradient
        g = tl.where(weight_decay != 0.0, g + weight_decay * theta, g)
    m = beta1 * m + one_minus_beta1 * g
    vhat = m
    if TRACK_V:  # compile-time: removes v's load, update and store (SGD memory at p = 0)
        v = beta2 * v + one_minus_beta2 * g * g
        if AMSGRAD:  # compile-time: removes v_max's load, max and store
            vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)  # torch.maximum
            vhat = vmax
        else:
            vhat = v
    return g_cos, m, v, vmax, vhat


@triton.jit
def _smes_direction(m, vhat, eps, exponent, bc2, bc2_sqrt, adapt, P_CLASS: tl.constexpr):
    """The update direction u = m / D (SPEC §1; u = m where adapt == 0: rectification's
    un-adapted steps, SPEC §4)."""
    if P_CLASS == 0:  # compile-time p = 0: no denominator math at all
        update = m / (1.0 + eps)
    else:
        if P_CLASS == 1:  # p = 0.5: AdamW's sqrt(v)/sqrt(bc2) + eps, rounded as torch
            denom = tl.div_rn(tl.sqrt_rn(vhat), bc2_sqrt) + eps
        else:  # general p: v̂^p = exp2(p·log2 v̂); v̂ = 0 and p < 0 give inf, the update is 0
            vh = tl.div_rn(vhat, bc2)
            denom = tl.exp2(exponent * tl.log2(vh)) + eps
        update = tl.div_rn(m, denom)
        update = tl.where(adapt != 0.0, update, m)  # RAdam's un-adapted steps: u = m-hat
    return update


@triton.jit
def _store_theta(p_ptr, offs, mask, theta, srow, elem, PARAM_DTYPE: tl.constexpr,
                 STOCHASTIC: tl.constexpr):  # fmt: skip
    """The new θ to storage: stochastically rounded (bf16 with STOCHASTIC) or to nearest."""
    if STOCHASTIC:
        key = tl.load(srow + S_KEY).to(tl.uint32, bitcast=True).to(tl.int64)
        tl.store(p_ptr + offs, _to_bf16_stochastic(theta, key, elem), mask=mask)
    else:
        tl.store(p_ptr + offs, _to_storage(theta, PARAM_DTYPE), mask=mask)


@triton.jit
def _smes_block(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    offs,
    mask,
    srow,
    inv_scale,
    row_ptr,
    row,
    rmask,
    elem,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    P_CLASS: tl.constexpr,
    TRACK_V: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    PHASE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """Load one block (storage dtype → float32), apply the rule, store it back.

    ``PHASE`` 0: the step. The projection's two passes (SPEC §4): 1, the moments (stored) and the
    row sums (g·θ, g·g, θ·θ, θ·u) added to ``row_ptr[4·row + c]``, θ not written; 2, the update
    u ← u − k_row·θ with ``k_row = row_ptr[row]`` (zero where the tensor has no rows), θ written."""
    theta = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = m  # placeholders with the right type when v / v_max are not tracked
    vmax = m
    if TRACK_V:
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        if AMSGRAD:
            vmax = tl.load(vmax_ptr + offs, mask=mask).to(tl.float32)
    eps = tl.load(srow + S_EPS_D)
    adapt = tl.load(srow + S_ADAPT)
    exponent = tl.load(srow + S_EXP)
    bc2 = tl.load(srow + S_BC2)
    bc2_sqrt = tl.load(srow + S_BC2_SQRT)
    if PHASE == 2:
        vhat = m
        if TRACK_V:
            if AMSGRAD:
                vhat = vmax
            else:
                vhat = v
        u = _smes_direction(m, vhat, eps, exponent, bc2, bc2_sqrt, adapt, P_CLASS)
        k = tl.load(row_ptr + row, mask=rmask, other=0.0)
        u = u - k * theta
        if DECOUPLED:  # the decision kernel set S_DECAY to the projected decay where it projects
            theta = theta * tl.load(srow + S_DECAY)
        theta = theta - tl.load(srow + S_STEP_SIZE) * u
        _store_theta(p_ptr, offs, mask, theta, srow, elem, PARAM_DTYPE, STOCHASTIC)
    else:
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        g_cos, m, v, vmax, vhat = _smes_moments(
            theta,
            g,
            m,
            v,
            vmax,
            inv_scale,
            tl.load(srow + S_BETA1),
            tl.load(srow + S_OMB1),
            tl.load(srow + S_BETA2),
            tl.load(srow + S_OMB2),
            tl.load(srow + S_WD),
            TRACK_V,
            DECOUPLED,
            AMSGRAD,
            MAXIMIZE,
        )
        u = _smes_direction(m, vhat, eps, exponent, bc2, bc2_sqrt, adapt, P_CLASS)
        if PHASE == 0:
            if DECOUPLED:  # decay == 1 exactly when λ == 0
                theta = theta * tl.load(srow + S_DECAY)
            theta = theta - tl.load(srow + S_STEP_SIZE) * u
            _store_theta(p_ptr, offs, mask, theta, srow, elem, PARAM_DTYPE, STOCHASTIC)
        else:
            out = row_ptr + 4 * row
            tl.atomic_add(out, g_cos * theta, mask=rmask)
            tl.atomic_add(out + 1, g_cos * g_cos, mask=rmask)
            tl.atomic_add(out + 2, theta * theta, mask=rmask)
            tl.atomic_add(out + 3, theta * u, mask=rmask)
    if PHASE != 2:  # the apply pass only reads the moments
        tl.store(m_ptr + offs, _to_storage(m, STATE_DTYPE), mask=mask)
        if TRACK_V:
            tl.store(v_ptr + offs, _to_storage(v, STATE_DTYPE), mask=mask)
            if AMSGRAD:
                tl.store(vmax_ptr + offs, _to_storage(vmax, STATE_DTYPE), mask=mask)


@triton.jit
def _smes_step_kernel(
    addr_ptr,
    scal_ptr,
    block_map_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    rows_ptr,  # the projection's row sums (PHASE 1) or row coefficients (PHASE 2); else unused
    PARAM_DTYPE: tl.constexpr,  # storage dtype of params and grads (fp32 / bf16 / fp16)
    STATE_DTYPE: tl.constexpr,  # storage dtype of exp_avg / exp_avg_sq / max_exp_avg_sq
    P_CLASS: tl.constexpr,  # 0: p = 0 (no denominator math), 1: p = 0.5 (sqrt), 2: general pow
    TRACK_V: tl.constexpr,  # False removes every access to v (and v_max)
    DECOUPLED: tl.constexpr,  # True: AdamW decay of θ; False: L2 term in the gradient
    AMSGRAD: tl.constexpr,  # False removes v_max's load, max and store
    MAXIMIZE: tl.constexpr,  # False removes the gradient negation
    BLOCK_SIZE: tl.constexpr,  # elements per program
    PHASE: tl.constexpr = 0,  # 0: the step; 1, 2: the projection's passes (see _smes_block)
    STOCHASTIC: tl.constexpr = False,  # bf16 params: stochastic rounding of θ
):
    """One SMES step over every tensor of a bucket; program ``pid`` updates one block.

    The block map gives (tensor ``i``, block ``b``); row ``i`` of the tables gives the tensor's
    addresses and ``n_elements``, row ``i`` of ``scal`` this step's float32 scalars (written by
    :func:`_smes_scalars_kernel`). When ``*found_inf_ptr != 0`` every load and store is masked
    off, so nothing changes and the host never syncs.
    """
    pid = tl.program_id(0)
    tensor = tl.load(block_map_ptr + 2 * pid).to(tl.int64)
    block = tl.load(block_map_ptr + 2 * pid + 1).to(tl.int64)
    row = addr_ptr + tensor * ROW
    srow = scal_ptr + tensor * SCAL_COLS
    n_elements = tl.load(row + COL_NUMEL)
    start = block * BLOCK_SIZE  # int64: tensors may exceed 2^31 elements
    # Offsets inside the block are int32: fewer registers than int64 addressing.
    offs = tl.arange(0, BLOCK_SIZE)
    found_inf = tl.load(found_inf_ptr)
    limit = tl.minimum(n_elements - start, BLOCK_SIZE).to(tl.int32)
    limit = tl.where(found_inf == 0.0, limit, 0)
    mask = offs < limit
    inv_scale = 1.0 / tl.load(grad_scale_ptr).to(tl.float32)
    elem = offs  # the elements' indices in their tensor (the stochastic rounding's counter)
    if STOCHASTIC:
        elem = start + offs
    # The projection's rows (SPEC §4): tensors without rows (dim 1) have k = 0 and no sums.
    rows_base = rows_ptr
    row_index = offs
    rmask = mask
    if PHASE != 0:
        n_rows = tl.load(row + COL_NROWS)
        row_len = n_elements // tl.maximum(n_rows, 1)
        row_index = (start + offs) // row_len
        # (offs < a scalar: the interpreter rejects a block mask combined with a scalar one)
        rmask = offs < tl.where(n_rows > 0, limit, 0)
        row0 = tl.load(row + COL_ROW0)
        if PHASE == 1:
            rows_base = rows_ptr + 4 * row0
        else:
            rows_base = rows_ptr + row0

    p_addr = tl.load(row + COL_P)
    g_addr = tl.load(row + COL_G)
    m_addr = tl.load(row + COL_M)
    v_addr = tl.load(row + COL_V)
    vmax_addr = tl.load(row + COL_VMAX)
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
    # block helper.
    if ((any_addr % 16) == 0) & (limit == BLOCK_SIZE):
        _smes_block(
            tl.multiple_of(p_addr.to(tl.pointer_type(PARAM_DTYPE)), 16),
            tl.multiple_of(g_addr.to(tl.pointer_type(PARAM_DTYPE)), 16),
            tl.multiple_of(m_addr.to(tl.pointer_type(STATE_DTYPE)), 16),
            tl.multiple_of(v_addr.to(tl.pointer_type(STATE_DTYPE)), 16),
            tl.multiple_of(vmax_addr.to(tl.pointer_type(STATE_DTYPE)), 16),
            offs,
            None,
            srow,
            inv_scale,
            rows_base,
            row_index,
            rmask,
            elem,
            PARAM_DTYPE,
            STATE_DTYPE,
            P_CLASS,
            TRACK_V,
            DECOUPLED,
            AMSGRAD,
            MAXIMIZE,
            PHASE,
            STOCHASTIC,
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
            srow,
            inv_scale,
            rows_base,
            row_index,
            rmask,
            elem,
            PARAM_DTYPE,
            STATE_DTYPE,
            P_CLASS,
            TRACK_V,
            DECOUPLED,
            AMSGRAD,
            MAXIMIZE,
            PHASE,
            STOCHASTIC,
        )


@triton.jit
def _smes_decide_kernel(addr_ptr, scal_ptr, stats_ptr, k_ptr, BLOCK_R: tl.constexpr):
    """AdamP/SGDP's decision (SPEC §4), one program per tensor, on the device (no host sync):
    from the row sums (g·θ, g·g, θ·θ, θ·u) of the first pass, per output channel then per layer,
    max |cos(g, θ)| < delta/sqrt(row length) projects. Writes the row coefficients k of
    u ← u − k·θ (0 where nothing projects), the projected decay into the tensor's ``S_DECAY``,
    and zeroes the row sums for the next step."""
    i = tl.program_id(0).to(tl.int64)
    row = addr_ptr + i * ROW
    n_rows = tl.load(row + COL_NROWS)
    if n_rows > 0:
        numel = tl.load(row + COL_NUMEL)
        row0 = tl.load(row + COL_ROW0)
        srow = scal_ptr + i * SCAL_COLS
        eps = tl.load(srow + S_EPS)
        delta = tl.load(srow + S_DELTA)
        row_len = numel // n_rows
        max_cos = 0.0
        n_nan = 0
        gt = 0.0
        gg = 0.0
        tt = 0.0
        tu = 0.0
        for r0 in range(0, n_rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            m = r < n_rows
            base = stats_ptr + 4 * (row0 + r)
            x0 = tl.load(base, mask=m, other=0.0)
            x1 = tl.load(base + 1, mask=m, other=0.0)
            x2 = tl.load(base + 2, mask=m, other=0.0)
            x3 = tl.load(base + 3, mask=m, other=0.0)
            c = tl.abs(x0) / (tl.maximum(tl.sqrt(x1), eps) * tl.maximum(tl.sqrt(x2), eps))
            n_nan += tl.sum((c != c).to(tl.int32))
            max_cos = tl.maximum(max_cos, tl.max(tl.where(m, c, 0.0)))
            gt += tl.sum(x0)
            gg += tl.sum(x1)
            tt += tl.sum(x2)
            tu += tl.sum(x3)
        by_row = (max_cos < delta / tl.sqrt(row_len.to(tl.float32))) & (n_nan == 0)
        c_layer = tl.abs(gt) / (tl.maximum(tl.sqrt(gg), eps) * tl.maximum(tl.sqrt(tt), eps))
        by_layer = (by_row == 0) & (c_layer < delta / tl.sqrt(numel.to(tl.float32)))
        tn = tl.sqrt(tt) + eps
        k_layer = tl.where(by_layer, tu / (tn * tn), 0.0)
        for r0 in range(0, n_rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            m = r < n_rows
            base = stats_ptr + 4 * (row0 + r)
            x2 = tl.load(base + 2, mask=m, other=0.0)
            x3 = tl.load(base + 3, mask=m, other=0.0)
            tr = tl.sqrt(x2) + eps
            k = tl.where(by_row, x3 / (tr * tr), k_layer)
            tl.store(k_ptr + row0 + r, k, mask=m)
            zero = tl.zeros((BLOCK_R,), tl.float32)
            tl.store(base, zero, mask=m)
            tl.store(base + 1, zero, mask=m)
            tl.store(base + 2, zero, mask=m)
            tl.store(base + 3, zero, mask=m)
        if by_row | by_layer:
            tl.store(srow + S_DECAY, tl.load(srow + S_DECAY_PROJ))
