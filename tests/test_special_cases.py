"""SPEC §4: the seed texts' optimizers as settings of SMES, on every backend.

- identities against peer implementations, 50 steps, ``assert_close`` defaults:
  ``torch.optim.RMSprop``, ``torch.optim.Adagrad``, ``torch.optim.RAdam`` (L2 and decoupled) and
  clovaai's ``adamp`` (``AdamP``, ``SGDP``) with gradients that do and do not trigger the
  projection (per output channel, per layer, neither);
- float64 oracle parity (SPEC §6 tolerances) of one step from a random state for every new
  option, alone and combined with amsgrad, maximize, both weight-decay modes and
  p ∈ {0.5, 0, −0.08, 0.37}.

The "triton" backend runs the real kernels under Triton's interpreter (see tests/test_generic.py).
"""

from __future__ import annotations

import itertools
import zlib

import oracle
import pytest
import torch
from _backends import require, use_triton_interpreter
from torch.testing import assert_close

from smes_fused import SMES

use_triton_interpreter()

BACKENDS = ["reference", "foreach", "cpu", "triton"]
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return require(request.param)


SHAPES = [(16, 12), (6, 3, 3, 3), (20,), (1, 30)]


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _grad(p: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A gradient for ``p``: "channel" orthogonal to every output channel of p (projection per
    channel), "layer" orthogonal to p as a whole only (projection per layer), "radial" with a
    component along p (no projection)."""
    g = torch.randn(p.shape, generator=gen)
    if p.dim() <= 1 or kind == "radial":  # |cos(g, p)| about 0.9 whatever the scale of p
        return g + 2 * p * (p.numel() ** 0.5 / p.norm().clamp_min(1e-30))
    rows = p.shape[0] if kind == "channel" else 1
    p2, g2 = p.reshape(rows, -1), g.reshape(rows, -1)
    g2 = g2 - p2 * ((g2 * p2).sum(1, keepdim=True) / (p2 * p2).sum(1, keepdim=True))
    return g2.reshape(p.shape)


def _run(make_opt, kind_of, steps=50, seed=0):
    params = [p.clone().requires_grad_() for p in _params(seed)]
    opt = make_opt(params)
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = _grad(p.detach(), kind_of(i, t), gen)
        opt.step()
    return [p.detach() for p in params]


def _same(ours, peer, kind_of=lambda i, t: "radial", steps=50):
    a = _run(ours, kind_of, steps)
    b = _run(peer, kind_of, steps)
    for x, y in zip(a, b):
        assert_close(x, y)


# ------------------------------------------------------------------------------ identities


def test_rmsprop(backend):
    _same(
        lambda ps: SMES(ps, lr=1e-2, betas=(0.0, 0.99), eps=1e-8, weight_decay=0,
                        bias_correction=False, backend=backend),  # fmt: skip
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2, alpha=0.99, eps=1e-8),
    )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adagrad(backend, weight_decay):
    _same(
        lambda ps: SMES(ps, lr=1e-2, betas=(0.0, 0.9), eps=1e-10, weight_decay=weight_decay,
                        decoupled_weight_decay=False, second_moment="sum",
                        bias_correction=False, backend=backend),  # fmt: skip
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2, eps=1e-10, weight_decay=weight_decay),
    )


@pytest.mark.parametrize("decoupled", [False, True])
def test_radam(backend, decoupled):
    _same(
        lambda ps: SMES(ps, lr=1e-3, weight_decay=0.1, decoupled_weight_decay=decoupled,
                        rectify=True, backend=backend),  # fmt: skip
        lambda ps: torch.optim.RAdam(ps, lr=1e-3, weight_decay=0.1,
                                     decoupled_weight_decay=decoupled),  # fmt: skip
    )


@pytest.mark.parametrize("eps, scale", [(1e-3, 1e-3), (1e-8, 1e-8)])
def test_radam_with_gradients_near_eps(backend, eps, scale):
    """torch's RAdam adds eps to sqrt(v) before the bias correction, (sqrt(v) + eps)/sqrt(bc2),
    and its un-rectified first steps take m-hat with no eps. With eps after the bias correction
    (SPEC §1's p = 0.5 rule) SMES's steps were up to 13x smaller from step 6 on for gradients
    near eps; the defaults (eps 1e-8, gradients near 1) hid it."""

    def run(make):
        params = [p.clone().requires_grad_() for p in _params()]
        opt = make(params)
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * scale
            opt.step()
        return [p.detach() for p in params]

    a = run(lambda ps: SMES(ps, lr=1e-3, eps=eps, weight_decay=0.0, rectify=True, backend=backend))
    b = run(lambda ps: torch.optim.RAdam(ps, lr=1e-3, eps=eps))
    for x, y, p0 in zip(a, b, _params(), strict=True):
        assert_close(x - p0, y - p0, rtol=1e-4, atol=1e-9)  # the 20 steps' movement


@pytest.mark.parametrize("kw", [dict(bias_correction=False), dict(second_moment="sum")])
def test_rectify_with_a_tensor_lr_and_no_second_bias_correction(backend, kw):
    """A tensor lr puts foreach on its device-step path, where bc2 = 1 (no bias correction, or
    AdaGrad's sum) stayed a float: the rectified eps failed there (float has no .to)."""

    def run(lr):
        params = [p.clone().requires_grad_() for p in _params()]
        opt = SMES(params, lr=lr, eps=1e-3, rectify=True, backend=backend, **kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach() for p in params]

    for x, y in zip(run(torch.tensor(1e-3)), run(1e-3), strict=True):
        assert_close(x, y)


KINDS = {
    "channel": lambda i, t: "channel",
    "layer": lambda i, t: "layer",
    "radial": lambda i, t: "radial",
    "mixed": lambda i, t: ("channel", "layer", "radial")[(i + t) % 3],
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_adamp(backend, kind):
    adamp = pytest.importorskip("adamp")
    _same(
        lambda ps: SMES(ps, lr=1e-2, weight_decay=0.1, projection=True, backend=backend),
        lambda ps: adamp.AdamP(ps, lr=1e-2, weight_decay=0.1, delta=0.1, wd_ratio=0.1),
        KINDS[kind],
    )


def _sgdp_class(adamp):
    """clovaai's SGDP with one difference: its ``_projection`` works on a copy of the update.

    adamp.SGDP (0.3.0) projects ``d_p`` in place, and without nesterov ``d_p`` *is* the momentum
    buffer, so a projected step also projects the stored momentum. SPEC §4 (like AdamP, whose
    update ``exp_avg / denom`` is a new tensor, and like the SGDP paper's algorithm) projects the
    update direction only. Where no projection happens the two agree exactly (the "radial"
    case below runs the unmodified adamp.SGDP)."""

    class SGDPUpdateOnly(adamp.SGDP):
        def _projection(self, p, grad, perturb, *args):
            return super()._projection(p, grad, perturb.clone(), *args)

    return SGDPUpdateOnly


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sgdp(backend, kind):
    adamp = pytest.importorskip("adamp")
    peer = adamp.SGDP if kind == "radial" else _sgdp_class(adamp)
    mu, lam = 0.9, 1e-2
    _same(
        lambda ps: SMES(ps, lr=0.1, betas=(mu, 0.999), exponent=0, bias_correction=False,
                        weight_decay=lam / (1 - mu), projection=True, backend=backend),  # fmt: skip
        lambda ps: peer(ps, lr=0.1, momentum=mu, dampening=mu, weight_decay=lam),
        KINDS[kind],
    )


def test_projection_of_dense_non_contiguous_params(backend):
    """projection=True on a channels_last conv weight and a transposed matrix (dense, not
    contiguous): the projection walks rows, so these go per tensor, with the results of the
    reference (Triton relaunched them in its fast path, which refused them on every step)."""
    gen = torch.Generator().manual_seed(3)
    conv = torch.randn(4, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last)
    tr = torch.randn(5, 7, generator=gen).t()
    out = {}
    for name in ("reference", backend):
        ps = [conv.clone(memory_format=torch.preserve_format).requires_grad_(),
              tr.clone(memory_format=torch.preserve_format).requires_grad_()]  # fmt: skip
        opt = SMES(ps, lr=1e-2, weight_decay=0.1, projection=True, backend=name)
        g = torch.Generator().manual_seed(4)
        for t in range(3):
            for i, p in enumerate(ps):
                kind = ("channel", "layer", "radial")[(i + t) % 3]
                p.grad = torch.empty_like(p).copy_(_grad(p.detach(), kind, g))  # p's layout
            opt.step()
        out[name] = [p.detach() for p in ps]
    assert not out[backend][0].is_contiguous() and not out[backend][1].is_contiguous()
    for x, y in zip(out[backend], out["reference"]):
        assert_close(x, y)


def test_sgdp_projects_its_momentum_buffer():
    """What the copy above changes, shown: adamp.SGDP's stored momentum is the projected one. A
    radial gradient (no projection) then an orthogonal one (projected): the buffer is not
    μ·buf + (1 − dampening)·g, it lost its component along θ."""
    adamp = pytest.importorskip("adamp")
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(8, 5, requires_grad=True)
    opt = adamp.SGDP([p], lr=0.1, momentum=0.9, dampening=0.9)
    p.grad = _grad(p.detach(), "radial", gen)
    opt.step()
    buf = opt.state[p]["momentum"].clone()
    theta = p.detach().clone()
    p.grad = _grad(theta, "channel", gen)
    opt.step()
    plain = 0.9 * buf + 0.1 * p.grad
    assert not torch.allclose(opt.state[p]["momentum"], plain)
    # what it lost is the radial part: its rows are orthogonal to θ (of before the step)
    rows = (opt.state[p]["momentum"] * theta).sum(1)
    assert rows.abs().max() < 1e-5 * (plain * theta).sum(1).abs().max()


def test_projection_triggers_as_intended():
    """The gradient kinds above do what the identity tests rely on."""
    from smes_fused.backends.reference import project

    gen = torch.Generator().manual_seed(3)
    for shape in [(16, 12), (6, 3, 3, 3)]:
        p = torch.randn(shape, generator=gen)
        u = torch.randn(shape, generator=gen)
        for kind, want in (("channel", True), ("layer", True), ("radial", False)):
            _, projected = project(p, _grad(p, kind, gen), u, 0.1, 1e-8)
            assert projected == want, (shape, kind)


# ------------------------------------------------------------------- float64 oracle parity

EXTENSIONS = {
    "projection": dict(projection=True),
    "rectify": dict(rectify=True),
    "sum": dict(second_moment="sum"),
    "all": dict(projection=True, rectify=True, second_moment="sum"),
    # a large eps: the rectified denominator's eps / bc2^p against the projection's own eps (the
    # Triton prologue gave the projection the rectified one, and so did the oracle)
    "projection+rectify, eps 1e-2": dict(projection=True, rectify=True, eps=1e-2),
}
COMBOS = [
    dict(),
    dict(amsgrad=True),
    dict(maximize=True),
    dict(decoupled_weight_decay=False),
    dict(amsgrad=True, maximize=True, decoupled_weight_decay=False),
]


@pytest.mark.parametrize("ext", sorted(EXTENSIONS))
@pytest.mark.parametrize("p", [0.5, 0.0, -0.08, 0.37])
@pytest.mark.parametrize("combo", range(len(COMBOS)))
@pytest.mark.parametrize("step", [3, 40])
def test_oracle_parity(backend, ext, p, combo, step):
    """One step from a random state at step count ``step`` (RAdam: 3 is before ρ_t > 5, 40
    after), every tensor kind of SHAPES, gradients that trigger the projection per channel, per
    layer, or not at all."""
    opts = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, exponent=p)
    opts |= EXTENSIONS[ext] | COMBOS[combo]
    gen = torch.Generator().manual_seed(zlib.crc32(repr((ext, p, combo, step)).encode()))
    params = [x.requires_grad_() for x in _params(combo)]
    opt = SMES(params, backend=backend, **opts)
    kinds = itertools.cycle(["channel", "layer", "radial"])
    olds = []
    for x in params:
        x.grad = _grad(x.detach(), next(kinds), gen)
        st = opt.state[x]
        st["step"] = torch.tensor(float(step - 1))
        st["exp_avg"] = torch.randn(x.shape, generator=gen) * 0.1
        if p != 0:
            st["exp_avg_sq"] = torch.rand(x.shape, generator=gen) * 0.01
            if opts.get("amsgrad"):
                st["max_exp_avg_sq"] = st["exp_avg_sq"] + torch.rand(x.shape, generator=gen) * 1e-3
        olds.append({k: v.clone() for k, v in st.items()} | {"param": x.detach().clone()})
    if backend in ("cpu", "triton"):
        for x in params:  # the fused backends keep step counts where the params are
            opt.state[x]["step"] = opt.state[x]["step"].to(x.device)
    opt.step()
    kw = {k: v for k, v in opts.items() if k not in ("betas",)}
    for x, old in zip(params, olds):
        ref_th, ref_m, ref_v, _ = oracle.spec_step(
            old["param"], x.grad, old["exp_avg"], old.get("exp_avg_sq"),
            old.get("max_exp_avg_sq"), step=step, betas=opts["betas"], **kw,
        )  # fmt: skip
        rtol = oracle.rtol_for(p)
        f32 = oracle.spec_step(
            old["param"], x.grad, old["exp_avg"], old.get("exp_avg_sq"),
            old.get("max_exp_avg_sq"), step=step, betas=opts["betas"], dtype=torch.float32, **kw,
        )[0]  # fmt: skip
        r = oracle.worst_ratio(x.detach(), old["param"], ref_th, rtol, f32=f32)
        assert oracle.record(backend, r) <= 1, (tuple(x.shape), r)
        assert oracle.worst_ratio(opt.state[x]["exp_avg"], old["exp_avg"], ref_m, rtol) <= 1
        if ref_v is not None:
            v = opt.state[x]["exp_avg_sq"]
            assert oracle.worst_ratio(v, old["exp_avg_sq"], ref_v, rtol) <= 1


def test_projection_of_sharded_params_is_refused(tmp_path):
    """DTensor params: the projection's reductions would need the other shards; a clear error,
    before anything changes."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    from torch.distributed.tensor import distribute_tensor, init_device_mesh

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                                world_size=1)  # fmt: skip
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh))
        before = p.detach().full_tensor().clone()
        opt = SMES([p], projection=True, backend="reference")
        p.grad = distribute_tensor(torch.randn(8, 4), mesh)
        with pytest.raises(NotImplementedError, match="projection=True with a sharded"):
            opt.step()
        assert torch.equal(p.detach().full_tensor(), before) and not opt.state[p]
    finally:
        if own:
            dist.destroy_process_group()
