"""Fused global gradient-norm clipping (``SMES(..., max_grad_norm=c)``), on every CPU backend and
the Triton interpreter: equivalence with ``torch.nn.utils.clip_grad_norm_`` + the step, float64
oracle parity of a clipped step (the coefficient computed in float64 here), GradScaler and
found_inf, the returned norm, bad input."""

from __future__ import annotations

import numpy as np
import oracle
import pytest
import torch
from _backends import require, use_triton_interpreter
from torch.testing import assert_close

from smes_fused import SMES

use_triton_interpreter()
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")


@pytest.fixture(params=["reference", "foreach", "cpu", "triton"])
def backend(request) -> str:
    return require(request.param)


SHAPES = [(40, 12), (12,), (3, 5, 2), (0,)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]


def _grads(step, scale):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) * scale for s in SHAPES]


@pytest.mark.parametrize("exponent", [0.5, -0.08])
@pytest.mark.parametrize("scale", [10.0, 1e-3])  # clipped every step / never clipped
def test_equals_clip_grad_norm_then_step(backend, exponent, scale):
    ours, theirs = _params(), _params()
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}]  # noqa: E731
    opt = SMES(groups(ours), exponent=exponent, lr=1e-2, max_grad_norm=1.0, backend=backend)
    ref = SMES(groups(theirs), exponent=exponent, lr=1e-2, backend="reference")
    for t in range(12):
        for a, b, g in zip(ours, theirs, _grads(t, scale)):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ref.step()
        assert_close(opt.grad_norm, norm)
    for a, b in zip(ours, theirs):
        assert_close(a, b)
        assert_close(opt.state[a]["exp_avg"], ref.state[b]["exp_avg"])


def test_exponent_half_equals_clip_grad_norm_and_fused_adamw():
    ours, theirs = _params(), _params()
    opt = SMES(ours, max_grad_norm=0.5)
    adamw = torch.optim.AdamW(theirs, fused=True)
    for t in range(20):
        for a, b, g in zip(ours, theirs, _grads(t, 5.0)):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        torch.nn.utils.clip_grad_norm_(theirs, 0.5, foreach=True)
        adamw.step()
    for a, b in zip(ours, theirs):
        assert_close(a, b)


@pytest.mark.parametrize("exponent", [0.5, 0.0, -0.08, 0.37])
def test_oracle_parity_of_a_clipped_step(backend, exponent):
    params = _params(1)
    opt = SMES(params, exponent=exponent, lr=3e-2, max_grad_norm=2.0, backend=backend)
    grads = _grads(0, 4.0)
    olds = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    total = sum(float(g.double().square().sum()) for g in grads) ** 0.5
    coef = min(1.0, 2.0 / (total + 1e-6))
    assert coef < 0.5  # the step is clipped
    for p, g, old in zip(params, grads, olds):
        m0 = torch.zeros_like(old)
        ref = oracle.spec_step(old, g.double() * coef, m0, None if exponent == 0 else m0.clone(),
                               step=1, lr=3e-2, exponent=exponent)[0]  # fmt: skip
        assert oracle.worst_ratio(p, old, ref, oracle.rtol_for(exponent)) <= 1


def test_grad_scaler_norm_is_of_the_unscaled_grads_and_found_inf_changes_nothing(backend):
    ours, theirs = _params(), _params()
    opt = SMES(ours, lr=1e-2, max_grad_norm=1.0, backend=backend)
    ref = SMES(theirs, lr=1e-2, backend="reference")
    scale = torch.tensor(1024.0)
    for t in range(3):
        for a, b, g in zip(ours, theirs, _grads(t, 3.0)):
            a.grad, b.grad = g * 1024.0, g.clone()
        opt.step(grad_scale=scale, found_inf=torch.tensor(0.0))
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ref.step()
        assert_close(opt.grad_norm, norm)
    for a, b in zip(ours, theirs):
        assert_close(a, b)
    before = [p.detach().clone() for p in ours]
    steps = [opt.state[p]["step"].clone() for p in ours]
    opt.step(grad_scale=scale, found_inf=torch.tensor(1.0))
    for p, b, s in zip(ours, before, steps):
        assert torch.equal(p, b) and torch.equal(opt.state[p]["step"], s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_scaler_norm_of_16bit_grads_does_not_overflow(backend, dtype):
    """GradScaler's 65536 on float16 grads: every scaled grad is finite, their norm is not in
    float16 (it was computed there, became inf, clipped every step to nothing, and the scaler
    never saw an inf). The norm is accumulated in float32: the step is that of the unscaled
    grads."""
    g = (torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 0.5).to(dtype)
    ours, theirs = (torch.ones(1000, dtype=dtype, requires_grad=True) for _ in range(2))
    opt = SMES([ours], lr=1e-2, max_grad_norm=1.0, backend=backend)
    ref = SMES([theirs], lr=1e-2, max_grad_norm=1.0, backend=backend)
    ours.grad, theirs.grad = g * 65536.0, g.clone()
    assert torch.isfinite(ours.grad).all()
    assert torch.isfinite(ours.grad.norm()) == (dtype == torch.bfloat16)
    opt.step(grad_scale=torch.tensor(65536.0), found_inf=torch.tensor(0.0))
    ref.step()
    assert_close(opt.grad_norm, g.float().norm())
    assert_close(ref.grad_norm, g.float().norm())
    assert not torch.equal(ours, torch.ones_like(ours))
    assert_close(ours, theirs)


def test_infinite_max_norm_reports_the_norm_without_clipping():
    ours, theirs = _params(), _params()
    opt = SMES(ours, max_grad_norm=float("inf"))
    ref = SMES(theirs)
    for a, b, g in zip(ours, theirs, _grads(0, 100.0)):
        a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    flat = torch.cat([g.flatten() for g in _grads(0, 100.0)])
    assert_close(opt.grad_norm, torch.linalg.vector_norm(flat))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_grad_norm_follows_the_steps():
    """``grad_norm``: the norm of each clipped step's gradients, 0 (as clip_grad_norm_) when no
    param has one, and None after a step without clipping (it kept an earlier step's norm)."""
    ps = _params()
    opt = SMES(ps, max_grad_norm=1.0)
    for p, g in zip(ps, _grads(0, 3.0)):
        p.grad = g
    opt.step()
    assert_close(
        opt.grad_norm, torch.linalg.vector_norm(torch.cat([g.flatten() for g in _grads(0, 3.0)]))
    )
    opt.max_grad_norm = None
    opt.step()
    assert opt.grad_norm is None
    opt.max_grad_norm = 2.0
    opt.zero_grad()
    opt.step()
    assert torch.equal(opt.grad_norm, torch.zeros(()))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True, np.float32(0.0)])
def test_bad_max_grad_norm(bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        SMES(_params(), max_grad_norm=bad)
    opt = SMES(_params())
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    opt.max_grad_norm = bad  # edited after construction: rejected at the step, nothing changes
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(opt.param_groups[0]["params"], before))
    assert not opt.state
