"""Backend "triton": the real Triton kernels, on CPU under Triton's interpreter.

Triton picks interpreter or compiler when a ``@triton.jit`` function is created, so this module
sets ``TRITON_INTERPRET=1`` before it imports the kernels (and leaves it set: Triton reads it again
at launch).
With ``SMES_TRITON_DEVICE=cuda`` the same tests run the compiled kernels on a GPU instead;
``test_cuda_suite`` does that in a subprocess when a CUDA device exists, and skips otherwise.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

DEVICE = os.environ.get("SMES_TRITON_DEVICE", "cpu")

if DEVICE == "cpu":
    # Left set for the whole process: Triton consults the knob again at launch time.
    os.environ["TRITON_INTERPRET"] = "1"
    from smes_fused.triton_kernels import smes as K

    if not K.INTERPRET:  # imported earlier for the GPU: create the kernels again
        K = importlib.reload(K)
else:
    from smes_fused.triton_kernels import smes as K

from oracle import rtol_for, spec_step, worst_ratio  # noqa: E402

import smes_fused  # noqa: E402
from smes_fused._bucket import Bucket, BucketKey, Hyper  # noqa: E402
from smes_fused.backends import get  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy log2(0) in masked lanes

EXPONENTS = [0.5, 0.0, -0.08, -0.3, 0.1, 0.37, 1.0]
SIZES = [1, 3, 127, 65537, 0]
DEV = torch.device(DEVICE)
WORST: dict = {}  # name -> worst ratio seen, printed at the end (pytest -s)


def _record(name: str, r: float) -> None:
    WORST[name] = max(WORST.get(name, 0.0), r)


def _state(n, *, seed, dtype=torch.float32, scale_v=1e-2, zero=False):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen)

    p = r(n).to(dtype)
    g = torch.zeros(n) if zero else r(n)
    m = torch.zeros(n) if zero else 0.1 * r(n)
    v = torch.zeros(n) if zero else scale_v * torch.rand(n, generator=gen) ** 2
    vm = v + (0 if zero else scale_v * torch.rand(n, generator=gen) ** 2)
    return p, g.to(dtype), m, v, vm


def _hyper(exponent, *, decoupled=True, amsgrad=False, maximize=False, bc=True, lr=1e-3, **kw):
    return Hyper(
        lr=lr,
        beta1=kw.get("beta1", 0.9),
        beta2=kw.get("beta2", 0.999),
        eps=kw.get("eps", 1e-8),
        exponent=exponent,
        weight_decay=kw.get("weight_decay", 1e-2),
        decoupled=decoupled,
        amsgrad=amsgrad,
        maximize=maximize,
        bias_correction=bc,
        track_v=kw.get("track_v", exponent != 0 or amsgrad),
    )


def _bucket(states, hypers, step, dtype=torch.float32):
    b = Bucket(BucketKey(DEV, dtype, torch.float32))
    for (p, g, m, v, vm), h in zip(states, hypers):
        b.append(
            p.clone().to(DEV),
            g.clone().to(DEV),
            m.clone().to(DEV),
            v.clone().to(DEV) if h.track_v else None,
            vm.clone().to(DEV) if h.variant.amsgrad else None,
            torch.tensor(float(step - 1), device=DEV),  # steps so far: the backend advances it
            h,
        )
    return b


def _oracle(state, h, step, dtype, grad_scale=None):
    p, g, m, v, vm = state
    return spec_step(
        p,
        g,
        m,
        v if h.track_v else None,
        vm if h.variant.amsgrad else None,
        step=step,
        lr=h.lr,
        betas=(h.beta1, h.beta2),
        eps=h.eps,
        exponent=h.exponent,
        weight_decay=h.weight_decay,
        decoupled_weight_decay=h.decoupled,
        amsgrad=h.variant.amsgrad,
        maximize=h.maximize,
        bias_correction=h.bias_correction,
        grad_scale=grad_scale,
        dtype=dtype,
    )


def _check_oracle(b, states, hypers, step, name, grad_scale=None):
    """Every tensor of the bucket against the float64 oracle (SPEC §6, float32 rule)."""
    for i, (st, h) in enumerate(zip(states, hypers)):
        ref = _oracle(st, h, step, torch.float64, grad_scale)
        f32 = _oracle(st, h, step, torch.float32, grad_scale)
        rtol = rtol_for(h.exponent)
        pairs = [(b.params[i], st[0], ref[0], f32[0]), (b.exp_avgs[i], st[2], ref[1], f32[1])]
        if h.track_v:
            pairs.append((b.exp_avg_sqs[i], st[3], ref[2], f32[2]))
        if h.variant.amsgrad:
            pairs.append((b.max_exp_avg_sqs[i], st[4], ref[3], f32[3]))
        for new, old, r64, r32 in pairs:
            plain = worst_ratio(new.cpu(), old, r64, rtol)
            _record(f"{name} (plain)", plain)
            ratio = worst_ratio(new.cpu(), old, r64, rtol, f32=r32)
            _record(name, ratio)
            assert ratio <= 1.0, (name, i, h, ratio)


def _run(backend, b, **kw):
    get(backend)(b, **kw)


# ------------------------------------------------------------------------------ availability


def test_backend_reports():
    be = get("triton")
    assert be.name == "triton" and be.steps_on_device
    assert be.unavailable() is None
    assert be.cannot_run(BucketKey(DEV, torch.float32, torch.float32)) is None
    assert be.cannot_run(BucketKey(DEV, torch.bfloat16, torch.float32)) is None
    assert "float64" in be.cannot_run(BucketKey(DEV, torch.float64, torch.float64))
    assert be.cannot_run(BucketKey(DEV, torch.float16, torch.float64)) is not None
    other = torch.device("cuda" if DEVICE == "cpu" else "cpu")
    assert "TRITON_INTERPRET" in be.cannot_run(BucketKey(other, torch.float32, torch.float32))


# ------------------------------------------------------------------------------ one-step parity


@pytest.mark.parametrize("exponent", EXPONENTS)
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_one_step_parity(exponent, decoupled, amsgrad):
    """Sizes 1, 3, 127, 65537 and 0 in one launch, against the float64 oracle and "reference"."""
    maximize = decoupled != amsgrad
    bc = not (decoupled and amsgrad)
    step = 1 if amsgrad else 7
    states = [_state(n, seed=n + 11) for n in SIZES]
    hypers = [
        _hyper(exponent, decoupled=decoupled, amsgrad=amsgrad, maximize=maximize, bc=bc)
        for _ in SIZES
    ]
    before = K.CACHE.stats["launches"]
    b = _bucket(states, hypers, step)
    _run("triton", b)
    assert K.CACHE.stats["launches"] == before + K.LAUNCHES_PER_STEP
    _check_oracle(b, states, hypers, step, f"p={exponent}")

    r = _bucket(states, hypers, step)
    _run("reference", r)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for x, y, st in zip(getattr(b, name), getattr(r, name), states):
            if x is None:
                assert y is None
                continue
            ratio = worst_ratio(x.cpu(), st[0], y.cpu().double(), rtol_for(exponent))
            _record("vs reference", ratio)
            assert ratio <= 1.0


@pytest.mark.parametrize("exponent", [0.5, -0.08, 1.0])
def test_grad_scale(exponent):
    states = [_state(n, seed=3) for n in (127, 65537)]
    hypers = [_hyper(exponent) for _ in states]
    scaled = [(p, g * 1024, m, v, vm) for p, g, m, v, vm in states]
    b = _bucket(scaled, hypers, 2)
    _run("triton", b, grad_scale=torch.tensor(1024.0, device=DEV))
    _check_oracle(b, scaled, hypers, 2, "grad_scale", grad_scale=1024.0)


def test_found_inf_changes_nothing():
    states = [_state(n, seed=5) for n in (3, 65537)]
    hypers = [_hyper(-0.08, amsgrad=True), _hyper(-0.08, amsgrad=True)]
    b = _bucket(states, hypers, 4)
    before = [t.clone() for t in b.params + b.exp_avgs + b.exp_avg_sqs + b.max_exp_avg_sqs]
    _run("triton", b, found_inf=torch.tensor(1.0, device=DEV))
    after = b.params + b.exp_avgs + b.exp_avg_sqs + b.max_exp_avg_sqs
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    _run("triton", b, found_inf=torch.tensor(0.0, device=DEV))  # and a zero flag applies it
    _check_oracle(b, states, hypers, 4, "found_inf=0")


def test_amsgrad_max_keeps_nan_as_torch_maximum():
    """A NaN v makes max_exp_avg_sq NaN, as torch.maximum (AdamW) and the other backends do; the
    kernel's tl.maximum dropped it (NaN-ignoring by default) and kept the old maximum."""
    from smes_fused import SMES

    g = torch.tensor([1e-3, float("nan"), float("inf"), -1e30, 0.0])
    got = {}
    for backend in ("reference", "triton"):
        par = torch.nn.Parameter(torch.linspace(-1, 1, 5, device=DEV))
        opt = SMES([par], exponent=-0.08, amsgrad=True, weight_decay=0.0, backend=backend)
        for grad in (torch.ones(5), g):
            par.grad = grad.to(DEV)
            opt.step()
        got[backend] = opt.state[par]["max_exp_avg_sq"].cpu()
    assert got["triton"][1].isnan()
    torch.testing.assert_close(got["triton"], got["reference"], equal_nan=True)


@pytest.mark.parametrize("exponent", [-0.08, -0.3, 0.37])
def test_zero_grads_never_nan(exponent):
    """v̂ = 0: p < 0 gives D = inf and an update of exactly 0; p > 0 gives D = eps."""
    states = [_state(n, seed=1, zero=True) for n in (3, 4096)]
    hypers = [_hyper(exponent, weight_decay=0.0, amsgrad=(i == 1)) for i in range(2)]
    b = _bucket(states, hypers, 1)
    _run("triton", b)
    for p, st in zip(b.params, states):
        assert torch.equal(p.cpu(), st[0])
    for t in b.exp_avgs + b.exp_avg_sqs:
        assert not t.isnan().any()


def test_several_groups_one_launch():
    """Different lr, betas, eps, exponent, weight decay and bias correction in one launch."""
    cfgs = [
        dict(exponent=-0.08, lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1),
        dict(exponent=0.37, lr=3e-4, beta1=0.0, beta2=0.9, eps=1e-8, weight_decay=0.0),
        dict(exponent=-0.3, lr=1e-3, beta1=0.95, beta2=0.999, eps=1e-3, bc=False),
        dict(exponent=1.0, lr=5e-4, beta1=0.9, beta2=0.98, eps=1e-5, weight_decay=1e-3),
    ]
    states = [_state(n, seed=n) for n in (127, 3, 65537, 1000)]
    hypers = [_hyper(**c) for c in cfgs]
    before = K.CACHE.stats["launches"]
    b = _bucket(states, hypers, 3)
    _run("triton", b)
    assert K.CACHE.stats["launches"] == before + K.LAUNCHES_PER_STEP
    _check_oracle(b, states, hypers, 3, "groups")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("exponent", [0.5, -0.08, 0.0])
def test_16bit_params(dtype, exponent):
    """Error against float64 at most 2x the error of the reference rule on the same 16-bit params
    (for p = 0.5 the reference is torch.optim.AdamW's rule; checked against AdamW too)."""
    n = 65537
    states = [_state(n, seed=9, dtype=dtype)]
    hypers = [_hyper(exponent, lr=1e-2)]
    b = _bucket(states, hypers, 1, dtype)
    r = _bucket(states, hypers, 1, dtype)
    _run("triton", b)
    _run("reference", r)
    ref64 = _oracle(states[0], hypers[0], 1, torch.float64)[0]
    err = (b.params[0].cpu().double() - ref64).abs().max().item()
    err_ref = (r.params[0].cpu().double() - ref64).abs().max().item()
    assert b.params[0].dtype == dtype and b.exp_avgs[0].dtype == torch.float32
    assert err <= 2 * err_ref + 1e-12, (err, err_ref)
    _record(f"16-bit err/ref err {dtype}", err / err_ref)
    if exponent == 0.5:
        p = torch.nn.Parameter(states[0][0].clone().to(DEV))
        p.grad = states[0][1].clone().to(DEV)
        opt = torch.optim.AdamW([p], lr=1e-2)
        opt.state[p] = dict(
            step=torch.tensor(0.0),
            exp_avg=states[0][2].clone().to(DEV, dtype),
            exp_avg_sq=states[0][3].clone().to(DEV, dtype),
        )
        opt.step()
        err_adamw = (p.detach().cpu().double() - ref64).abs().max().item()
        assert err <= 2 * err_adamw + 1e-12, (err, err_adamw)


# ------------------------------------------------------------------------------ through SMES


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    sizes = [(65537,), (3,), (127,), (0,), (1,), (33, 7)]
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=DEV)) for s in sizes]


def _groups(params, exponents):
    return [
        dict(params=params[0:2], exponent=exponents[0], lr=1e-2, betas=(0.8, 0.99)),
        dict(params=params[2:4], exponent=exponents[1], weight_decay=0.0, eps=1e-6),
        dict(params=params[4:], exponent=exponents[2], decoupled_weight_decay=False),
    ]


@pytest.mark.parametrize("exponents", [(-0.08, 0.5, -0.3), (0.37, -0.08, 0.1)])
def test_smes_20_steps_vs_reference_and_oracle(exponents):
    """20 steps, three groups, a zero-size param, a grad that is None on some steps."""
    pt, pr = _model(), _model()
    ot = smes_fused.SMES(_groups(pt, exponents), backend="triton")
    orf = smes_fused.SMES(_groups(pr, exponents), backend="reference")
    hyp = [
        _hyper(exponents[0], lr=1e-2, beta1=0.8, beta2=0.99),
        _hyper(exponents[1], weight_decay=0.0, eps=1e-6),
        _hyper(exponents[2], decoupled=False),
    ]
    owner = [0, 0, 1, 1, 2, 2]
    o64 = [[p.detach().double().cpu(), None, torch.zeros(p.shape).double(), None, 0] for p in pr]
    gen = torch.Generator().manual_seed(1)
    calls = []
    K.LAUNCH_HOOKS.append(lambda consts, n, ptrs: calls.append(consts))
    try:
        for step in range(20):
            calls.clear()
            for i, (a, b) in enumerate(zip(pt, pr)):
                if i == 1 and step % 3 == 1:
                    a.grad = b.grad = None
                    continue
                g = torch.randn(a.shape, generator=gen)
                a.grad = g.clone().to(DEV)
                b.grad = g.clone().to(DEV)
                st = o64[i]
                h = hyp[owner[i]]
                st[3] = st[3] if st[3] is not None else torch.zeros(a.shape).double()
                st[4] += 1
                st[0], st[2], st[3], _ = _oracle(
                    (st[0], g, st[2], st[3], None), h, st[4], torch.float64
                )
            ot.step()
            orf.step()
            variants = {tuple(sorted(c.items(), key=str)) for c in calls}
            assert len(calls) == len(variants)  # one launch per variant, never per group
    finally:
        K.LAUNCH_HOOKS.clear()
    for i, (a, b) in enumerate(zip(pt, pr)):
        rtol = rtol_for(hyp[owner[i]].exponent)
        _record("20 steps vs reference", worst_ratio(a.cpu(), b.cpu(), b.cpu().double(), rtol))
        assert worst_ratio(a.cpu(), b.cpu(), b.cpu().double(), rtol) <= 1.0
        r = worst_ratio(a.cpu(), a.cpu(), o64[i][0], rtol)
        _record("20 steps vs float64", r)
        assert r <= 1.0
        assert float(ot.state[a]["step"]) == (13 if i == 1 else 20)


def _jit_cache_size() -> int:
    """Compiled specialisations of the element kernel in Triton's JIT cache (GPU only)."""
    caches = K._smes_step_kernel.device_caches
    return sum(len(c[0]) for c in caches.values())


def test_exponent_lr_betas_change_without_recompile():
    params = _model()
    opt = smes_fused.SMES(params, exponent=-0.08, backend="triton")
    for p in params:  # a first step compiles this variant (other tests may have filled the cache)
        p.grad = torch.ones_like(p)
    opt.step()
    cached = _jit_cache_size() if DEVICE == "cuda" else 0
    seen = set()
    K.LAUNCH_HOOKS.append(lambda consts, n, ptrs: seen.add(tuple(sorted(consts.items(), key=str))))
    try:
        builds = None
        for i, p_exp in enumerate([-0.08, -0.3, 0.1, 0.37, 1.0, -0.5]):
            for p in params:
                p.grad = torch.ones_like(p)
            for g in opt.param_groups:
                g["exponent"] = p_exp
                g["lr"] = 1e-3 * (i + 1)
                g["betas"] = (0.9 - 0.01 * i, 0.999)
            opt.step()
            builds = K.CACHE.stats["builds"] if builds is None else builds
            assert K.CACHE.stats["builds"] == builds  # no new tables
    finally:
        K.LAUNCH_HOOKS.clear()
    assert len(seen) == 1  # one specialisation: p, lr and betas are data
    if DEVICE == "cuda":  # the JIT's own cache: nothing new compiled for any of them
        assert _jit_cache_size() == cached


def test_default_and_scaler_pointers_specialise_alike():
    """Triton specialises pointer arguments on 16-byte alignment: the defaults that stand in for
    grad_scale / found_inf must be aligned like a GradScaler's tensors, or a step with a scaler
    compiles a second kernel."""
    keys = []
    K.LAUNCH_HOOKS.append(
        lambda consts, n, ptrs: keys.append(tuple(t.data_ptr() % 16 == 0 for t in ptrs.values()))
    )
    try:
        states = [_state(n, seed=2) for n in (3, 127)]
        hypers = [_hyper(-0.08) for _ in states]
        _run("triton", _bucket(states, hypers, 1))
        scale = torch.full((1,), 1.0, device=DEV)  # fresh, aligned allocations, as GradScaler's
        inf = torch.zeros(1, device=DEV)
        _run("triton", _bucket(states, hypers, 1), grad_scale=scale, found_inf=inf)
    finally:
        K.LAUNCH_HOOKS.clear()
    assert len(keys) == 2 and keys[0] == keys[1] and all(keys[0]), keys


def test_table_cache_reacts_to_reallocated_grads():
    params = _model()
    ref = _model()
    opt = smes_fused.SMES(params, exponent=-0.08, backend="triton")
    orf = smes_fused.SMES(ref, exponent=-0.08, backend="reference")
    keep = []
    for step in range(3):
        for a, b in zip(params, ref):
            keep.append(torch.empty(a.numel() + 17, device=DEV))
            # The new grad is allocated while the old one lives: a new address, never the
            # just-freed block (the caching allocator would hand that back).
            new = torch.randn(a.shape, device=DEV)
            a.grad = new
            b.grad = a.grad.clone()
        builds, uploads = K.CACHE.stats["builds"], K.CACHE.stats["uploads"]
        opt.step()
        orf.step()
        if step > 0:
            assert K.CACHE.stats["builds"] == builds  # buffers reused
            assert K.CACHE.stats["uploads"] == uploads + 1  # the new grad addresses (non-empty)
    # same storages again: nothing to upload
    uploads = K.CACHE.stats["uploads"]
    opt.step()
    orf.step()
    assert K.CACHE.stats["uploads"] == uploads
    for a, b in zip(params, ref):
        assert worst_ratio(a.cpu(), b.cpu(), b.cpu().double(), 1e-5) <= 1.0


def test_capturable_tensor_lr_and_found_inf_step():
    params = _model()
    ref = _model()
    lr = torch.tensor(1e-2, device=DEV)
    opt = smes_fused.SMES(params, lr=lr, exponent=-0.3, capturable=True, backend="triton")
    orf = smes_fused.SMES(ref, lr=1e-2, exponent=-0.3, backend="reference")
    for _ in range(3):
        for a, b in zip(params, ref):
            a.grad = torch.randn(a.shape, device=DEV)
            b.grad = a.grad.clone()
        opt.step()
        orf.step()
        lr.mul_(0.5)  # read by the kernel from the device, no re-upload
        for g in orf.param_groups:
            g["lr"] *= 0.5
    for a, b in zip(params, ref):
        assert worst_ratio(a.cpu(), b.cpu(), b.cpu().double(), 1e-5) <= 1.0
    snap = [p.detach().clone() for p in params]
    opt.step(found_inf=torch.tensor(1.0, device=DEV))
    for a, s in zip(params, snap):
        assert torch.equal(a, s)
    assert float(opt.state[params[0]]["step"]) == 3.0


# ------------------------------------------------------------------------------ a real GPU


@pytest.mark.gpu
def test_cuda_suite():
    """This file again, compiled for the GPU, in a fresh process (the mode is per process)."""
    if DEVICE != "cpu":
        pytest.skip("already running on CUDA")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the compiled-kernel parity suite needs one")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SMES_TRITON_DEVICE"] = "cuda"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", __file__, "-k", "not test_cuda_suite"],
        env=env,
        capture_output=True,
        text=True,
    )
    print(r.stdout[-4000:], r.stderr[-2000:])
    assert r.returncode == 0


def test_16bit_state():
    """state_dtype = the params' dtype (bf16 / fp16 state), against the reference rule."""
    for dtype in (torch.bfloat16, torch.float16):
        p, g, m, v, vm = _state(4099, seed=4, dtype=dtype)
        h = _hyper(-0.08, lr=1e-2)
        outs = []
        for backend in ("triton", "reference"):
            b = Bucket(BucketKey(DEV, dtype, dtype))
            b.append(
                p.clone().to(DEV),
                g.clone().to(DEV),
                m.to(DEV, dtype),
                v.to(DEV, dtype),
                None,
                torch.tensor(2.0, device=DEV),
                h,
            )
            _run(backend, b)
            outs.append(b)
        ref64 = _oracle((p, g, m.to(dtype), v.to(dtype), vm), h, 2, torch.float64)
        for k, name in ((0, "params"), (1, "exp_avgs"), (2, "exp_avg_sqs")):
            t, r = getattr(outs[0], name)[0], getattr(outs[1], name)[0]
            assert t.dtype == dtype
            err = (t.cpu().double() - ref64[k]).abs().max().item()
            err_ref = (r.cpu().double() - ref64[k]).abs().max().item()
            assert err <= 2 * err_ref + 1e-12, (dtype, name, err, err_ref)


def test_print_worst_ratios():
    """Runs last: prints the worst ratio per check (visible with pytest -s)."""
    for k, v in sorted(WORST.items()):
        print(f"worst ratio {k}: {v:.3g}")
    assert all(math.isfinite(v) for v in WORST.values())


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU run (on a GPU: test_cuda_gpu)")
def test_dtensor_params_step_their_local_shards(tmp_path):
    """Issue 14 item 1: the address table read data_ptr() of DTensor params (0), and the
    interpreter segfaulted. The optimizer now hands every backend the local shards."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.tensor import DTensor, distribute_tensor, init_device_mesh

    own = not dist.is_initialized()
    if own:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
        )
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        full = torch.randn(16, 8)
        p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh))
        r = torch.nn.Parameter(full.clone())
        opt = smes_fused.SMES([p], exponent=-0.08, backend="triton")
        ref = smes_fused.SMES([r], exponent=-0.08, backend="reference")
        for _ in range(3):
            g = torch.randn(16, 8)
            p.grad = distribute_tensor(g.clone(), mesh)
            r.grad = g
            opt.step()
            ref.step()
        assert isinstance(opt.state[p]["exp_avg"], DTensor)
        assert not isinstance(opt.state[p]["step"], DTensor)
        torch.testing.assert_close(p.full_tensor(), r, rtol=1e-5, atol=1e-6)
    finally:
        if own:
            dist.destroy_process_group()
