"""Parity of every host backend with the float64 evaluation of SPEC §1, and SPEC §1's identities."""

import itertools

import pytest
import torch
from oracle import host_backends, record, rtol_for, spec_step, worst_ratio

import smes_fused
from smes_fused import functional

BACKENDS = host_backends()
EXPONENTS = [0.5, 0.0, -0.08, -0.3, 0.1, 0.37, 1.0]
CONFIGS = {
    "adamw": dict(weight_decay=1e-2, decoupled_weight_decay=True),
    "l2": dict(weight_decay=5e-2, decoupled_weight_decay=False),
    "amsgrad": dict(amsgrad=True),
    "maximize": dict(maximize=True),
    "no_bc": dict(bias_correction=False),
    "no_wd": dict(weight_decay=0.0),
}
SIZES = [1, 3, 127, 65537, 0]


def _state(n, exponent, amsgrad, gen, dtype=torch.float32):
    """A mid-training state: random params/moments, v spanning many magnitudes (with zeros)."""
    p = torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(n, generator=gen).mul_(10 ** torch.empty(n).uniform_(-4, 1, generator=gen))
    m = 0.1 * torch.randn(n, generator=gen)
    v = torch.rand(n, generator=gen) * 10 ** torch.empty(n).uniform_(-12, 0, generator=gen)
    v[::17] = 0.0
    g[::17] = 0.0
    m[::17] = 0.0
    vmax = v + torch.rand(n, generator=gen) * v if amsgrad else None
    return p, g.to(dtype), m, v, vmax


def _ill_conditioned(exponent, cfg):
    return exponent == 1.0 or not cfg.get("decoupled_weight_decay", True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exponent", EXPONENTS)
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_one_step_matches_float64(backend, exponent, cfg_name):
    cfg = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, exponent=exponent, **CONFIGS[cfg_name])
    amsgrad = cfg.get("amsgrad", False)
    gen = torch.Generator().manual_seed(hash((exponent, cfg_name)) % 2**31)
    step0 = 6
    tensors = [_state(n, exponent, amsgrad, gen) for n in SIZES]
    olds = [t[0].clone() for t in tensors]
    refs = [spec_step(*t, step=step0 + 1, **cfg) for t in tensors]
    f32s = [
        [spec_step(*t, step=step0 + 1, dtype=torch.float32, fused_l2=f, **cfg)[0] for f in (0, 1)]
        for t in tensors
    ]
    track = exponent != 0
    steps = [torch.tensor(float(step0)) for _ in tensors]
    functional.smes(
        [t[0] for t in tensors],
        [t[1] for t in tensors],
        [t[2] for t in tensors],
        [t[3] if track else None for t in tensors],
        [t[4] for t in tensors],
        steps,
        lr=cfg["lr"],
        beta1=0.9,
        beta2=0.99,
        eps=cfg["eps"],
        exponent=exponent,
        weight_decay=cfg.get("weight_decay", 1e-2),
        decoupled_weight_decay=cfg.get("decoupled_weight_decay", True),
        amsgrad=amsgrad,
        maximize=cfg.get("maximize", False),
        bias_correction=cfg.get("bias_correction", True),
        backend=backend,
    )
    rtol = rtol_for(exponent)
    ill = _ill_conditioned(exponent, cfg)
    for t, old, ref, f32, s in zip(tensors, olds, refs, f32s, steps):
        assert s.item() == step0 + 1
        assert torch.isfinite(t[0]).all()
        r = worst_ratio(t[0], old, ref[0], rtol, f32 if ill else None)
        assert record(backend, r) <= 1.0, f"param error {r:.3g}x tolerance (n={t[0].numel()})"
        assert worst_ratio(t[2], t[2], ref[1], rtol) <= 1.0
        if track:
            assert worst_ratio(t[3], t[3], ref[2], rtol) <= 1.0
        if amsgrad and track:
            assert torch.equal(t[4], torch.maximum(t[4], t[3]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exponent", [-0.3, -0.08, 0.0, 0.25, 0.5])
def test_twenty_steps_match_float64_with_skipped_grads(backend, exponent):
    """SPEC §6: 20 float32 steps against a float64 run from the same start; one param's grad
    is None every third step (its step count must not advance) and one param is empty."""
    torch.manual_seed(0)
    shapes = [(33, 7), (5,), (0,), (1,)]
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    opt = smes_fused.SMES(ps, lr=3e-3, exponent=exponent, weight_decay=1e-2, backend=backend)
    ref = [p.detach().double().clone() for p in ps]
    ms = [torch.zeros_like(r) for r in ref]
    vs = [torch.zeros_like(r) for r in ref]
    counts = [0] * len(ps)
    start = [p.detach().clone() for p in ps]
    for t in range(20):
        for i, p in enumerate(ps):
            if i == 1 and t % 3 == 0:
                p.grad = None
                continue
            p.grad = torch.randn(p.shape)
            counts[i] += 1
            ref[i], ms[i], vs[i], _ = spec_step(
                ref[i],
                p.grad,
                ms[i],
                vs[i] if exponent != 0 else None,
                None,
                step=counts[i],
                lr=3e-3,
                exponent=exponent,
                weight_decay=1e-2,
            )
            vs[i] = vs[i] if vs[i] is not None else torch.zeros_like(ref[i])
        opt.step()
    for i, p in enumerate(ps):
        if p.numel() == 0:
            continue
        assert opt.state[p]["step"].item() == counts[i]
        r = worst_ratio(p, start[i], ref[i], rtol_for(exponent))
        assert record(backend, r) <= 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exponent", [-0.3, -0.08])
def test_negative_exponent_zero_grads_give_zero_update(backend, exponent):
    torch.manual_seed(1)
    ps = [torch.randn(n, requires_grad=True) for n in (1, 3, 127)]
    before = [p.detach().clone() for p in ps]
    opt = smes_fused.SMES(ps, exponent=exponent, weight_decay=0.0, backend=backend)
    for _ in range(3):
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, b in zip(ps, before):
        assert torch.isfinite(p).all()
        assert torch.equal(p.detach(), b)


# ------------------------------------------------------------------ identities of SPEC §1


def _train_pair(make_a, make_b, steps=50, shapes=((64, 33), (33,), (7, 3, 5), (1,)), seed=0):
    torch.manual_seed(seed)
    pa = [torch.randn(s, requires_grad=True) for s in shapes]
    pb = [p.detach().clone().requires_grad_() for p in pa]
    oa, ob = make_a(pa), make_b(pb)
    for _ in range(steps):
        for a, b in zip(pa, pb):
            g = torch.randn(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    return pa, pb, oa, ob


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["fused", "foreach", "forloop"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_exponent_half_is_adamw(backend, kind, amsgrad):
    flag = {
        "fused": dict(fused=True),
        "foreach": dict(foreach=True),
        "forloop": dict(foreach=False),
    }
    pa, pb, *_ = _train_pair(
        lambda ps: smes_fused.SMES(ps, exponent=0.5, amsgrad=amsgrad, backend=backend),
        lambda ps: torch.optim.AdamW(ps, amsgrad=amsgrad, **flag[kind]),
    )
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exponent_half_l2_is_adam(backend):
    pa, pb, *_ = _train_pair(
        lambda ps: smes_fused.SMES(
            ps, exponent=0.5, weight_decay=1e-2, decoupled_weight_decay=False, backend=backend
        ),
        lambda ps: torch.optim.Adam(ps, weight_decay=1e-2),
    )
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_exponent_zero_is_sgd_momentum(backend, weight_decay):
    lr, mu = 0.1, 0.9
    pa, pb, oa, _ = _train_pair(
        lambda ps: smes_fused.SMES(
            ps,
            lr=lr,
            betas=(mu, 0.999),
            exponent=0.0,
            bias_correction=False,
            weight_decay=weight_decay,
            decoupled_weight_decay=False,
            backend=backend,
        ),
        lambda ps: torch.optim.SGD(ps, lr=lr * (1 - mu), momentum=mu, weight_decay=weight_decay),
    )
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b)
    for p in pa:
        assert set(oa.state[p]) == {"step", "exp_avg"}, "p = 0 keeps one state tensor"


# ------------------------------------------------------------------ 16-bit params


def _lowp_baseline(p0, grads, dtype, **cfg):
    """torch.optim.AdamW's treatment of 16-bit params, for any p: fp32 math, state stored in
    the param dtype, param rounded every step."""
    p = p0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        p32, m32, v32, _ = spec_step(p, g, m, v, None, step=t, dtype=torch.float32, **cfg)
        p, m, v = p32.to(dtype), m32.to(dtype), v32.to(dtype)
    return p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("exponent", [0.5, 0.25, -0.08, 0.0])
def test_sixteen_bit_params_error_at_most_twice_adamw(backend, dtype, exponent):
    torch.manual_seed(2)
    n, steps = 4096, 10
    cfg = dict(lr=1e-2, exponent=exponent, weight_decay=1e-2)
    p0 = torch.randn(n).to(dtype)
    grads = [torch.randn(n).to(dtype) for _ in range(steps)]
    p = p0.clone().requires_grad_()
    opt = smes_fused.SMES([p], backend=backend, **cfg)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    ref = p0.double()
    m = torch.zeros_like(ref)
    v = torch.zeros_like(ref)
    for t, g in enumerate(grads, 1):
        ref, m, v, _ = spec_step(ref, g, m, v, None, step=t, **cfg)
    err = (p.detach().double() - ref).abs().max().item()
    base = _lowp_baseline(p0, grads, dtype, **cfg)
    base_err = (base.double() - ref).abs().max().item()
    if exponent == 0.5:  # the real torch.optim.AdamW on the same 16-bit params
        q = p0.clone().requires_grad_()
        adamw = torch.optim.AdamW([q], lr=1e-2, weight_decay=1e-2)
        for g in grads:
            q.grad = g.clone()
            adamw.step()
        base_err = max(base_err, (q.detach().double() - ref).abs().max().item())
    assert err <= 2 * base_err, f"{dtype} error {err:.3g} > 2x AdamW-style {base_err:.3g}"


# ------------------------------------------------------------------ groups, schedulers, amp


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_with_different_exponents_match_separate_optimizers(backend):
    torch.manual_seed(3)
    specs = [dict(exponent=-0.08, lr=1e-2), dict(exponent=0.5, lr=1e-3), dict(exponent=0.0, lr=0.1)]
    pa = [
        [torch.randn(17, 5, requires_grad=True), torch.randn(5, requires_grad=True)] for _ in specs
    ]
    pb = [[p.detach().clone().requires_grad_() for p in ps] for ps in pa]
    joint = smes_fused.SMES(
        [dict(params=ps, **s) for ps, s in zip(pa, specs)], exponent=0.3, backend=backend
    )
    separate = [smes_fused.SMES(ps, backend="reference", **s) for ps, s in zip(pb, specs)]
    for _ in range(5):
        for a, b in zip(itertools.chain(*pa), itertools.chain(*pb)):
            g = torch.randn(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        joint.step()
        for o in separate:
            o.step()
    for a, b in zip(itertools.chain(*pa), itertools.chain(*pb)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=12),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5),
    ],
)
def test_lr_schedulers_work_unchanged(make_sched):
    def run(make_opt):
        torch.manual_seed(4)
        p = torch.randn(20, requires_grad=True)
        o = make_opt([p])
        s = make_sched(o)
        torch.manual_seed(5)
        for _ in range(12):
            p.grad = torch.randn(20)
            o.step()
            s.step()
        return p

    a = run(lambda ps: smes_fused.SMES(ps, exponent=0.5))
    b = run(lambda ps: torch.optim.AdamW(ps))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_changes_nothing_and_grad_scale_unscales(backend):
    torch.manual_seed(6)
    p = torch.randn(300, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    o1 = smes_fused.SMES([p], exponent=-0.08, backend=backend)
    o2 = smes_fused.SMES([q], exponent=-0.08, backend="reference")
    g = torch.randn(300)
    p.grad, q.grad = g * 1024, g.clone()
    o1.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
    o2.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    snap = [p.detach().clone()] + [t.clone() for t in o1.state[p].values()]
    p.grad = torch.full((300,), float("inf"))
    o1.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0))
    after = [p.detach()] + list(o1.state[p].values())
    assert all(torch.equal(a, b) for a, b in zip(snap, after))
    assert o1.state[p]["step"].item() == 1


def test_grad_scaler_drives_smes():
    torch.manual_seed(7)
    model = torch.nn.Linear(8, 4)
    ref = torch.nn.Linear(8, 4)
    ref.load_state_dict(model.state_dict())
    opt = smes_fused.SMES(model.parameters(), exponent=0.25)
    opt_ref = smes_fused.SMES(ref.parameters(), exponent=0.25, backend="reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x = torch.randn(16, 8)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        opt_ref.zero_grad()
        ref(x).square().mean().backward()
        opt_ref.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_and_capturable_match_float_lr(backend):
    torch.manual_seed(8)
    p = torch.randn(50, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    o1 = smes_fused.SMES(
        [p], lr=torch.tensor(2e-3), capturable=True, exponent=0.37, backend=backend
    )
    o2 = smes_fused.SMES([q], lr=2e-3, exponent=0.37, backend="reference")
    for _ in range(4):
        g = torch.randn(50)
        p.grad, q.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
