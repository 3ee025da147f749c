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
# 8 words per tensor, then one per param group.
_c = tl.constexpr
ROW = _c(8)
COL_P, COL_G, COL_M, COL_V, COL_VMAX, COL_STEP, COL_NUMEL, COL_GROUP = (_c(i) for i in range(8))
# Group row: float64 beta1, beta2, eps, exponent, weight_decay; int64 flags; float64 lr; int64
# lr address (a device tensor lr, read every step) or 0.
GCOL_BETA1, GCOL_BETA2, GCOL_EPS, GCOL_EXP, GCOL_WD, GCOL_FLAGS, GCOL_LR, GCOL_LR_ADDR = (
    _c(i) for i in range(8)
)
FLAG_BIAS_CORRECTION = _c(1)
LR_SHIFT = _c(1)  # flags >> LR_SHIFT: where the lr is read (LR_*)
LR_HOST, LR_F32, LR_F64, LR_BF16, LR_F16 = (_c(i) for i in range(5))
# Per-tensor float32 scalars of one step (written by the prologue, read by every block).
SCAL_COLS = _c(16)
(S_STEP_SIZE, S_DECAY, S_BC2, S_BC2_SQRT, S_BETA1, S_OMB1, S_BETA2, S_OMB2, S_EPS, S_EXP,
 S_WD) = (_c(i) for i in range(11))  # fmt: skip

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
    lr = _load_lr(gi_ptr, gf_ptr, flags >> LR_SHIFT, mask)

    # The step count, advanced here (float32, as torch's _foreach_add_) unless found_inf is set.
    step_ptr = step_addr.to(tl.pointer_type(tl.float32))
    old_step = tl.load(step_ptr, mask=mask, other=0.0)
    step = old_step + 1.0
    found_inf = tl.load(found_inf_ptr)
    tl.store(step_ptr, tl.where(found_inf == 0.0, step, old_step), mask=mask)

    t = step.to(tl.float64)
    bc_on = (flags & FLAG_BIAS_CORRECTION) != 0
    bc1 = tl.where(bc_on, 1.0 - tl.exp2(t * tl.log2(beta1)), 1.0)
    bc2 = tl.where(bc_on, 1.0 - tl.exp2(t * tl.log2(beta2)), 1.0)
    out = scal_ptr + i.to(tl.int64) * SCAL_COLS
    tl.store(out + S_STEP_SIZE, (lr / bc1).to(tl.float32), mask=mask)
    tl.store(out + S_DECAY, (1.0 - lr * weight_decay).to(tl.float32), mask=mask)
    tl.store(out + S_BC2, bc2.to(tl.float32), mask=mask)
    tl.store(out + S_BC2_SQRT, tl.sqrt(bc2).to(tl.float32), mask=mask)
    tl.store(out + S_BETA1, beta1.to(tl.float32), mask=mask)
    tl.store(out + S_OMB1, (1.0 - beta1).to(tl.float32), mask=mask)
    tl.store(out + S_BETA2, beta2.to(tl.float32), mask=mask)
    tl.store(out + S_OMB2, (1.0 - beta2).to(tl.float32), mask=mask)
    tl.store(out + S_EPS, eps.to(tl.float32), mask=mask)
    tl.store(out + S_EXP, exponent.to(tl.float32), mask=mask)
    tl.store(out + S_WD, weight_decay.to(tl.float32), mask=mask)


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

    Inputs are float32 blocks (``v``/``vmax`` unused when not tracked) and the float32 scalars of
    the tensor (``decay = 1 − η·λ``, ``step_size = η/bc1``, ``bc2``, ``bc2_sqrt = sqrt(bc2)``).
    Returns the new ``(theta, m, v, vmax)``.
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
    srow,
    inv_scale,
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
        tl.load(srow + S_BETA1),
        tl.load(srow + S_OMB1),
        tl.load(srow + S_BETA2),
        tl.load(srow + S_OMB2),
        tl.load(srow + S_EPS),
        tl.load(srow + S_EXP),
        tl.load(srow + S_WD),
        tl.load(srow + S_DECAY),
        tl.load(srow + S_STEP_SIZE),
        tl.load(srow + S_BC2),
        tl.load(srow + S_BC2_SQRT),
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
    scal_ptr,
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
            srow,
            inv_scale,
            PARAM_DTYPE,
            STATE_DTYPE,
            P_CLASS,
            TRACK_V,
            DECOUPLED,
            AMSGRAD,
            MAXIMIZE,
        )
