"""Ahead-of-time compile of every SMES Triton kernel variant for sm_80 and sm_90, without a GPU.

Every (exponent class, track_v, amsgrad) × weight-decay mode × maximize × supported dtype pair is
compiled for ``GPUTarget("cuda", 80, 32)`` and ``("cuda", 90, 32)`` with the launch config the
host wrapper uses; the test asserts 0 register spills (no local memory, no stack), no float64
instruction in the element kernel (the per-tensor float64 bias corrections are the prologue's,
once per tensor per step), and prints the register count of each. The prologue kernel is
compiled for each target too. Compiles run in spawned worker processes (the kernels must be created
with TRITON_INTERPRET unset, whatever the test process uses) and land in Triton's on-disk cache,
so a second run takes seconds.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import multiprocessing as mp
import os
import re
import subprocess
import tempfile
import time

import pytest

triton = pytest.importorskip("triton")

TARGETS = (80, 90)
# (P_CLASS, TRACK_V, AMSGRAD): amsgrad only where v is tracked; p = 0.5 / general always track v.
CLASSES = [
    (0, False, False),
    (0, True, False),
    (0, True, True),
    (1, True, False),
    (1, True, True),
    (2, True, False),
    (2, True, True),
]
DTYPES = [  # (param, state): what the backend's cannot_run accepts
    ("fp32", "fp32"),
    ("bf16", "fp32"),
    ("fp16", "fp32"),
    ("bf16", "bf16"),
    ("fp16", "fp16"),
]


def _variants():
    for cap, (pc, tv, ams), dec, mx, (pd, sd) in itertools.product(
        TARGETS, CLASSES, (True, False), (False, True), DTYPES
    ):
        yield (cap, pc, tv, ams, dec, mx, pd, sd)


def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _compile(v):
    """Compile one variant; returns (variant, registers, local bytes, stack bytes, seconds)."""
    import triton
    import triton.language as tl
    from smes_fused.triton_kernels import smes as K
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not K.INTERPRET
    cap, pc, tv, ams, dec, mx, pd, sd = v
    tys = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    block, warps = 1024, 8  # K.launch_config on a GPU
    consts = dict(
        PARAM_DTYPE=tys[pd],
        STATE_DTYPE=tys[sd],
        P_CLASS=pc,
        TRACK_V=tv,
        DECOUPLED=dec,
        AMSGRAD=ams,
        MAXIMIZE=mx,
        BLOCK_SIZE=block,
        PHASE=0,
        STOCHASTIC=False,
    )
    sig = {
        "addr_ptr": "*i64",
        "scal_ptr": "*fp32",
        "block_map_ptr": "*i32",
        "grad_scale_ptr": "*fp32",
        "found_inf_ptr": "*fp32",
        "rows_ptr": "*fp32",
        **{k: "constexpr" for k in consts},
    }
    # The table buffers, and grad_scale / found_inf (16-byte aligned, defaults included).
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    t0 = time.time()
    src = ASTSource(fn=K._smes_step_kernel, signature=sig, constexprs=consts, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": warps})
    f64 = re.findall(r"\.f64\b", c.asm["ptx"])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", out)
    regs, stack, local = (int(x) for x in m.groups())
    return v, regs, local, stack, len(f64), time.time() - t0


def _res_usage(cubin: bytes) -> tuple[int, int, int]:
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", out)
    return tuple(int(x) for x in m.groups())


def _compile_prologue(cap):
    """The per-tensor prologue (step counts, float64 bias corrections) for one target."""
    import triton
    from smes_fused.triton_kernels import smes as K
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_t = K.launch_config(None)[2]
    sig = {
        "addr_ptr": "*i64",
        "group_ptr": "*i64",
        "group_f_ptr": "*fp64",
        "scal_ptr": "*fp32",
        "found_inf_ptr": "*fp32",
        "n_tensors": "i32",
        "BLOCK_T": "constexpr",
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    src = ASTSource(
        fn=K._smes_scalars_kernel, signature=sig, constexprs={"BLOCK_T": block_t}, attrs=attrs
    )
    c = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": 4})
    return cap, *_res_usage(c.asm["cubin"])


def test_aot_every_variant_no_spills(monkeypatch):
    # Workers inherit this process's environment when they are spawned: test_triton.py sets
    # TRITON_INTERPRET=1 for the whole session, and a worker that starts with it compiles the
    # interpreter's kernels (removing it in the worker is too late for Triton's knob).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t0 = time.time()
    variants = list(_variants())
    workers = max(1, min(len(os.sched_getaffinity(0)), 4))
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as ex:
        prologues = list(ex.map(_compile_prologue, TARGETS))
        results = list(ex.map(_compile, variants, chunksize=8))
    names = {0: "p=0", 1: "p=0.5", 2: "general"}
    print(f"\n{len(results)} compiles in {time.time() - t0:.1f}s with {workers} workers")
    print("target  p-class  track_v amsgrad decoupled maximize param/state  regs")
    bad = []
    fp64 = []
    for (cap, pc, tv, ams, dec, mx, pd, sd), regs, local, stack, n64, _ in results:
        print(f"sm_{cap}  {names[pc]:8} {tv!s:7} {ams!s:7} {dec!s:9} {mx!s:8} {pd}/{sd:5}  {regs}")
        if local or stack:
            bad.append((cap, pc, tv, ams, dec, mx, pd, sd, local, stack))
        if n64:
            fp64.append((cap, pc, tv, ams, dec, mx, pd, sd, n64))
    for cap, regs, stack, local in prologues:
        print(f"sm_{cap}  prologue (step counts, bias corrections): {regs} registers")
        if local or stack:
            bad.append(("prologue", cap, local, stack))
    for cap in TARGETS:
        rs = [r for v, r, *_ in results if v[0] == cap]
        print(f"sm_{cap}: registers min {min(rs)} max {max(rs)}")
    assert not bad, f"register spills (local/stack bytes) in {bad}"
    assert not fp64, f"float64 instructions in the element kernel: {fp64[:5]}"
    assert len(results) == len(variants) == 2 * 7 * 2 * 2 * 5
