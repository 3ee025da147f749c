"""The GPU backends on a real GPU: "triton" (compiled kernels) and "cuda" (compiled extension)
against "reference", every variant and dtype, grad_scale/found_inf, capturable steps, a whole
training step captured in a CUDA graph after ``zero_grad(set_to_none=True)``, several GPUs, and
DTensor parameters on a 1-GPU mesh.

Every test skips with a reason without a CUDA device (nothing queries CUDA at import time). Run
by ``python -m bench.gpu_check`` (phase "tests"); sized to finish in about a minute on an H100.
"""

from __future__ import annotations

import os

import pytest
import torch

import smes_fused
from smes_fused.backends import available

pytestmark = pytest.mark.gpu


def _skip_without(backend: str) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1" and backend == "triton":
        pytest.skip("TRITON_INTERPRET=1 in this process: the Triton kernels run interpreted")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    why = available().get(backend, "not registered")
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable: {why}")


BACKENDS = ["triton", "cuda"]
SHAPES = [(1,), (3,), (127,), (1000003,), (0,), (33, 7), (1, 8)]
# (exponent, decoupled, amsgrad, maximize, bias_correction): every compile-time variant class.
VARIANTS = [
    (0.5, True, False, False, True),
    (0.5, False, True, True, True),
    (0.0, True, False, False, False),
    (0.0, False, False, True, True),
    (-0.08, True, False, False, True),
    (-0.08, True, True, False, True),
    (-0.3, False, False, True, False),
    (0.37, True, True, True, True),
]
DTYPES = [  # (param dtype, state_dtype)
    (torch.float32, None),
    (torch.bfloat16, None),
    (torch.float16, None),
    (torch.bfloat16, "param"),
    (torch.float16, "param"),
]


def _params(dtype, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to("cuda", dtype)) for s in shapes]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params]


def _run(backend, dtype, state_dtype, variant, steps=5, **step_kw):
    exponent, decoupled, amsgrad, maximize, bc = variant
    params = _params(dtype)
    opt = smes_fused.SMES(
        params,
        lr=1e-2,
        exponent=exponent,
        decoupled_weight_decay=decoupled,
        amsgrad=amsgrad,
        maximize=maximize,
        bias_correction=bc,
        state_dtype=state_dtype,
        backend=backend,
    )
    for s in range(steps):
        for p, g in zip(params, _grads(params, s + 1)):
            p.grad = g * step_kw.get("scale", 1.0)
        kw = {}
        if "scale" in step_kw:
            kw["grad_scale"] = torch.tensor(step_kw["scale"], device="cuda")
            kw["found_inf"] = torch.tensor(0.0, device="cuda")
        opt.step(**kw)
    return params, opt


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_variants_float32(backend, variant):
    _skip_without(backend)
    got, o1 = _run(backend, torch.float32, None, variant)
    ref, o2 = _run("reference", torch.float32, None, variant)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **_tol(torch.float32))
    for a, b in zip(got, ref):
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            if k in o2.state[b]:
                x, y = o1.state[a][k], o2.state[b][k]
                torch.testing.assert_close(x.float().cpu(), y.float().cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES[1:], ids=str)
def test_16bit(backend, dtypes):
    _skip_without(backend)
    variant = VARIANTS[4]
    got, _ = _run(backend, *dtypes, variant)
    ref, _ = _run("reference", *dtypes, variant)
    for a, b in zip(got, ref):
        assert a.dtype == dtypes[0]
        torch.testing.assert_close(a.float(), b.float(), **_tol(dtypes[0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_and_found_inf(backend):
    _skip_without(backend)
    got, opt = _run(backend, torch.float32, None, VARIANTS[5], scale=1024.0)
    ref, _ = _run("reference", torch.float32, None, VARIANTS[5])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    snap = [p.detach().clone() for p in got]
    state = {k: v.clone() for k, v in opt.state[got[0]].items()}
    scale, inf = torch.tensor(2.0, device="cuda"), torch.tensor(1.0, device="cuda")
    opt.step(grad_scale=scale, found_inf=inf)
    assert all(torch.equal(a, b) for a, b in zip(got, snap))
    assert all(torch.equal(opt.state[got[0]][k], v) for k, v in state.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler(backend):
    """torch.amp.GradScaler drives the step (its found_inf/grad_scale; an inf step skipped)."""
    _skip_without(backend)
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 8).cuda()
    opt = smes_fused.SMES(model.parameters(), exponent=-0.08, backend=backend)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(16, 32, device="cuda")
    for i in range(4):
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean() * (float("inf") if i == 2 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert float(opt.state[model.weight]["step"]) == 3.0
    assert torch.isfinite(model.weight).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_step_cuda_graph_with_set_to_none(backend):
    """torch.cuda.graphs' whole-network recipe: warm-up on a side stream, then
    zero_grad(set_to_none=True) and forward + backward + step captured; replays must match an
    eager run step for step."""
    _skip_without(backend)

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)
        ).cuda()
        o = smes_fused.SMES(
            m.parameters(),
            lr=torch.tensor(1e-3, device="cuda"),
            exponent=-0.08,
            capturable=True,
            backend=backend,
        )
        return m, o

    xs = [torch.randn(32, 64, device="cuda") for _ in range(8)]
    ys = [torch.randn(32, 8, device="cuda") for _ in range(8)]

    def loss_of(m, x, y):
        return torch.nn.functional.mse_loss(m(x), y)

    model, opt = make()
    sx, sy = xs[0].clone(), ys[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            sx.copy_(xs[i])
            sy.copy_(ys[i])
            opt.zero_grad(set_to_none=True)
            loss_of(model, sx, sy).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_of(model, sx, sy).backward()
        opt.step()
    for i in range(3, 8):
        sx.copy_(xs[i])
        sy.copy_(ys[i])
        graph.replay()
    torch.cuda.synchronize()

    ref, ref_opt = make()
    for i in range(8):
        ref_opt.zero_grad(set_to_none=True)
        loss_of(ref, xs[i], ys[i]).backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert float(opt.state[next(model.parameters())]["step"]) == 8.0


def test_triton_graph_tables_outlive_lru():
    """A captured graph keeps reading its tables after many other tables filled the LRU."""
    _skip_without("triton")
    from smes_fused.triton_kernels import smes as K

    p = _params(torch.float32, shapes=[(4096,)])
    opt = smes_fused.SMES(p, exponent=-0.08, capturable=True, backend="triton")
    p[0].grad = torch.randn_like(p[0])
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(K.CACHE.capacity + 4):  # fill and evict the eager LRU
        q = _params(torch.float32, seed=i, shapes=[(i + 1,)])
        o = smes_fused.SMES(q, backend="triton")
        q[0].grad = torch.ones_like(q[0])
        o.step()
    before = p[0].detach().clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(before, p[0]) and torch.isfinite(p[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr_dtype", [torch.float64, torch.bfloat16])
def test_device_lr_of_another_dtype(backend, lr_dtype):
    _skip_without(backend)
    params = _params(torch.float32, shapes=[(1000,), (7,)])
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lr = torch.tensor(1e-2, dtype=lr_dtype, device="cuda")
    opt = smes_fused.SMES(params, lr=lr, exponent=-0.08, capturable=True, backend=backend)
    orf = smes_fused.SMES(ref, lr=float(lr), exponent=-0.08, backend="reference")
    for s in range(3):
        for a, b, g in zip(params, ref, _grads(params, s)):
            a.grad, b.grad = g, g.clone()
        opt.step()
        orf.step()
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_triton_no_recompile_with_a_grad_scaler():
    """The defaults standing in for grad_scale/found_inf are 16-byte aligned like a scaler's:
    a step with a scaler after one without compiles nothing new."""
    _skip_without("triton")
    from smes_fused.triton_kernels import smes as K

    params = _params(torch.float32, shapes=[(4096,), (5,)])
    opt = smes_fused.SMES(params, exponent=-0.08, backend="triton")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    caches = K._smes_step_kernel.device_caches
    n = sum(len(c[0]) for c in caches.values())
    scale, inf = torch.full((1,), 2.0, device="cuda"), torch.zeros(1, device="cuda")
    opt.step(grad_scale=scale, found_inf=inf)
    assert sum(len(c[0]) for c in caches.values()) == n


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_gpu_while_first_is_current(backend):
    _skip_without(backend)
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    torch.cuda.set_device(0)
    p = torch.nn.Parameter(torch.randn(5000, device="cuda:1"))
    r = torch.nn.Parameter(p.detach().clone())
    opt = smes_fused.SMES([p], exponent=-0.08, backend=backend)
    orf = smes_fused.SMES([r], exponent=-0.08, backend="reference")
    for _ in range(3):
        g = torch.randn(5000, device="cuda:1")
        p.grad, r.grad = g, g.clone()
        opt.step()
        orf.step()
    torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_on_a_one_gpu_mesh(backend, tmp_path):
    _skip_without(backend)
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.tensor import distribute_tensor, init_device_mesh

    own = not dist.is_initialized()
    if own:
        dist.init_process_group(
            "nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
        )
    try:
        mesh = init_device_mesh("cuda", (1,))
        torch.manual_seed(0)
        full = torch.randn(64, 32, device="cuda")
        p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh))
        r = torch.nn.Parameter(full.clone())
        opt = smes_fused.SMES([p], exponent=-0.08, backend=backend)
        orf = smes_fused.SMES([r], exponent=-0.08, backend="reference")
        for _ in range(3):
            g = torch.randn(64, 32, device="cuda")
            p.grad = distribute_tensor(g.clone(), mesh)
            r.grad = g
            opt.step()
            orf.step()
        torch.testing.assert_close(p.full_tensor(), r, rtol=1e-5, atol=1e-6)
    finally:
        if own:
            dist.destroy_process_group()
