"""Exponent schedules (smes_fused.schedules, SPEC §4): values per step against their closed
forms, checkpoints, use next to an lr scheduler, depth groups, the errors at construction, and
that changing p through a schedule recompiles and rebuilds nothing (SPEC §3)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from _backends import require, use_triton_interpreter
from torch import nn
from torch.optim import lr_scheduler
from torch.testing import assert_close

from smes_fused import SMES
from smes_fused.schedules import (
    CosineExponent,
    CyclicExponent,
    ExponentScheduler,
    LinearExponent,
    depth_param_groups,
)

K = use_triton_interpreter()
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")


def _params(seed=0, shapes=((4, 3), (3,), (5,))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def _two_groups(**kw):
    a, b, c = _params()
    return SMES([{"params": [a, b], "exponent": 0.5}, {"params": [c], "exponent": -0.1}], **kw)


def _grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


# Closed forms, written out as the docstrings state them.
def _linear(t, s, e, n):
    return s if t <= 0 else e if t >= n else s + (e - s) * t / n


def _cosine(t, s, e, n):
    return s if t <= 0 else e if t >= n else e + (s - e) * (1.0 + math.cos(math.pi * t / n)) / 2.0


def _cyclic(t, s, e, period):
    r = t % period
    u = 2 * min(r, period - r) / period
    return s if u == 0 else e if u == 1 else s + (e - s) * u


CASES = [
    (LinearExponent, dict(total_steps=7), lambda t, s, e: _linear(t, s, e, 7)),
    (CosineExponent, dict(total_steps=7), lambda t, s, e: _cosine(t, s, e, 7)),
    (CyclicExponent, dict(period=6), lambda t, s, e: _cyclic(t, s, e, 6)),
]


@pytest.mark.parametrize("cls,kw,form", CASES, ids=[c[0].__name__ for c in CASES])
def test_values_per_step_are_the_closed_form(cls, kw, form):
    opt = _two_groups()
    starts, ends = [0.5, 0.3], -0.08
    sched = cls(opt, start=starts, end=ends, **kw)
    assert sched.last_epoch == 0  # construction wrote step 0's values
    for t in range(16):
        want = [form(t, s, ends) for s in starts]
        assert sched.get_last_exponent() == want, t  # exact
        assert [g["exponent"] for g in opt.param_groups] == want
        sched.step()
        assert sched.last_epoch == t + 1
    if cls is not CyclicExponent:  # endpoints exactly, and it stays at the end
        assert sched.get_last_exponent() == [ends, ends]
    else:  # period 6: start at t = 0 mod 6, end at t = 3 mod 6
        assert [form(t, 0.5, ends) for t in (0, 3, 6, 9)] == [0.5, ends, 0.5, ends]


def test_none_means_the_groups_initial_exponent():
    opt = _two_groups()
    sched = LinearExponent(opt, start=0.5, end=None, total_steps=4)
    assert sched.end_exponents == [0.5, -0.1]
    assert [g["initial_exponent"] for g in opt.param_groups] == [0.5, -0.1]
    for _ in range(4):
        sched.step()
    assert sched.get_last_exponent() == [0.5, -0.1]
    mixed = CosineExponent(_two_groups(), start=[None, 0.2], end=0.0, total_steps=3)
    assert mixed.start_exponents == [0.5, 0.2]


def _run(steps, *, resume_at=None, backend="cpu"):
    """Exponents and params of a run with a cyclic schedule; with ``resume_at``, the run is saved
    (torch.save) at that step and finished by a fresh optimizer and schedule."""
    params = _params()
    opt = SMES(params, lr=1e-2, exponent=0.3, backend=backend)
    sched = CyclicExponent(opt, start=0.3, end=-0.2, period=5)
    seen = []
    for t in range(steps):
        if t == resume_at:
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf)
            params = [p.detach().clone().requires_grad_() for p in params]
            opt = SMES(params, lr=1e-2, exponent=0.3, backend=backend)
            sched = CyclicExponent(opt, start=0.0, end=0.1, period=3)  # overwritten by the load
            sched.load_state_dict(saved["sched"])
            opt.load_state_dict(saved["opt"])
        _grads(params, t)
        opt.step()
        sched.step()
        seen.append((sched.last_epoch, sched.get_last_exponent(), opt.param_groups[0]["exponent"]))
    return seen, params


def test_state_dict_round_trip_mid_schedule_continues_identically():
    straight, p1 = _run(9)
    resumed, p2 = _run(9, resume_at=4)
    assert resumed == straight
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)


def test_state_dict_holds_no_optimizer_and_loads_in_either_order():
    opt = _two_groups()
    sched = LinearExponent(opt, start=0.5, end=0.1, total_steps=10)
    for _ in range(3):
        sched.step()
    sd = sched.state_dict()
    assert "optimizer" not in sd and sd["last_epoch"] == 3
    opt2 = _two_groups()
    sched2 = LinearExponent(opt2, start=0.5, end=0.1, total_steps=10)
    sched2.load_state_dict(sd)  # the groups get step 3's values without the optimizer's sd
    assert [g["exponent"] for g in opt2.param_groups] == sched.get_last_exponent()
    sched.step()
    sched2.step()
    assert sched2.get_last_exponent() == sched.get_last_exponent()


def test_state_dict_with_a_non_finite_current_exponent_is_rejected():
    """The loaded current exponent goes into the groups: a NaN one was written there and
    broke the next step()."""
    opt = _two_groups()
    sched = LinearExponent(opt, start=0.5, end=0.1, total_steps=10)
    sd = sched.state_dict()
    sd["_last_exponent"] = [float("nan"), 0.3]
    before = [g["exponent"] for g in opt.param_groups]
    with pytest.raises(ValueError, match="current exponent of param group 0"):
        sched.load_state_dict(sd)
    assert [g["exponent"] for g in opt.param_groups] == before


@pytest.mark.parametrize(
    "edit, words",
    [
        (dict(last_epoch="3"), "Invalid last_epoch"),
        (dict(last_epoch=-7), "Invalid last_epoch"),
        (dict(last_epoch=2.5), "Invalid last_epoch"),
        (dict(total_steps=0), "Invalid total_steps"),
        (dict(total_steps="x"), "Invalid total_steps"),
        ("cyclic", "not a LinearExponent state dict"),
    ],
    ids=str,
)
def test_state_dict_that_does_not_fit_is_rejected_with_nothing_changed(edit, words):
    """A bad last_epoch or total_steps, or another schedule's state: refused as the constructor
    refuses them, the schedule and the groups unchanged (they were loaded, and the next step()
    raised a TypeError or ran a schedule mixed from two)."""
    opt = _two_groups()
    sched = LinearExponent(opt, start=0.5, end=0.1, total_steps=10)
    sched.step()
    if edit == "cyclic":
        sd = CyclicExponent(_two_groups(), start=0.5, end=0.1, period=4).state_dict()
    else:
        sd = {**sched.state_dict(), **edit}
    before = dict(sched.state_dict()), [g["exponent"] for g in opt.param_groups]
    with pytest.raises(ValueError, match=words):
        sched.load_state_dict(sd)
    assert (sched.state_dict(), [g["exponent"] for g in opt.param_groups]) == before
    sched.step()


def test_next_to_an_lr_scheduler_each_sets_its_own_key():
    """StepLR and a cosine exponent on one optimizer, against the same run with both values set
    by hand each step."""
    pa, pb = _params(), _params()
    a = SMES(pa, lr=0.1, exponent=0.4, backend="reference")
    b = SMES(pb, lr=0.1, exponent=0.4, backend="reference")
    lr_s = lr_scheduler.StepLR(a, step_size=2, gamma=0.5)
    p_s = CosineExponent(a, start=0.4, end=-0.2, total_steps=5)
    for t in range(7):
        lr, p = 0.1 * 0.5 ** (t // 2), _cosine(t, 0.4, -0.2, 5)
        assert a.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-15)
        assert a.param_groups[0]["exponent"] == p
        b.param_groups[0].update(lr=a.param_groups[0]["lr"], exponent=p)
        _grads(pa, t)
        _grads(pb, t)
        a.step()
        b.step()
        lr_s.step()
        p_s.step()
    assert lr_s.get_last_lr() == [0.1 * 0.5**3]
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


def test_bad_input_raises_at_construction():
    opt = _two_groups()
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match="finite"):
        LinearExponent(opt, start=float("nan"), end=0.1, total_steps=3)
    with pytest.raises(ValueError, match="finite"):
        CyclicExponent(opt, start=0.1, end=[0.2, float("inf")], period=3)
    with pytest.raises(ValueError, match="3 entries.*2 param groups"):
        LinearExponent(opt, start=[0.1, 0.2, 0.3], end=0.1, total_steps=3)
    with pytest.raises(TypeError, match="Invalid start: '0.5'"):
        LinearExponent(opt, start="0.5", end=0.1, total_steps=3)
    with pytest.raises(TypeError, match="real number"):
        LinearExponent(opt, start=[0.5, torch.tensor(0.1)], end=0.1, total_steps=3)
    with pytest.raises(ValueError, match="total_steps"):
        LinearExponent(opt, start=0.5, end=0.1, total_steps=0)
    with pytest.raises(ValueError, match="total_steps"):
        CosineExponent(opt, start=0.5, end=0.1, total_steps=2.5)
    with pytest.raises(ValueError, match="period"):
        CyclicExponent(opt, start=0.5, end=0.1, period=1)
    with pytest.raises(TypeError, match="SMES"):
        LinearExponent(torch.optim.AdamW(_params()), start=0.5, end=0.1, total_steps=3)
    assert opt.param_groups == before  # nothing written

    # A group made with exponent=0 keeps no exp_avg_sq: SMES refuses a non-zero p for it, so a
    # schedule that would give it one fails now, not at some later step.
    sgd_like = SMES(_params(), exponent=0.0)
    with pytest.raises(ValueError, match="param group 0 cannot take the exponent 0.5.*"
                       "track_second_moment=True"):  # fmt: skip
        LinearExponent(sgd_like, start=0.0, end=0.5, total_steps=10)
    LinearExponent(sgd_like, start=0.0, end=0.0, total_steps=10)  # stays at 0: fine
    tracked = SMES(_params(), exponent=0.0, track_second_moment=True)
    LinearExponent(tracked, start=0.0, end=0.5, total_steps=10)
    # p > 0 with eps = 0 is rejected by SMES (v = 0 would give 0/0): here too, at either end.
    no_eps = SMES(_params(), exponent=-0.1, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        CyclicExponent(no_eps, start=-0.1, end=0.2, period=4)
    CyclicExponent(no_eps, start=-0.1, end=-0.3, period=4)

    sched = LinearExponent(_two_groups(), start=0.5, end=0.1, total_steps=3)
    with pytest.raises(ValueError, match="param groups"):
        LinearExponent(SMES(_params()), start=0.5, end=0.1, total_steps=3).load_state_dict(
            sched.state_dict()
        )
    with pytest.raises(ValueError, match="state dict"):
        sched.load_state_dict({"last_epoch": 3})
    with pytest.raises(KeyError, match="initial_exponent"):
        LinearExponent(SMES(_params()), end=0.1, total_steps=3, last_epoch=2)


# ------------------------------------------------------------------ depth_param_groups


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),  # layer 0 (+ its norm)
        nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(),    # layer 1
        nn.Linear(8, 8),                                # layer 2
        nn.Linear(8, 2),                                # layer 3
    )  # fmt: skip


def test_depth_groups_on_a_sequential():
    net = _net()
    groups = depth_param_groups(net, 0.5, -0.1, lr=3e-3, weight_decay=0.0)
    expect = [
        [net[0].weight, net[0].bias, net[1].weight, net[1].bias],
        [net[3].weight, net[3].bias, net[4].weight, net[4].bias],
        [net[6].weight, net[6].bias],
        [net[7].weight, net[7].bias],
    ]
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in e] for e in expect]
    assert [g["exponent"] for g in groups] == [0.5, 0.5 + (-0.6) * 1 / 3, 0.5 - 0.6 * 2 / 3, -0.1]
    assert all(g["lr"] == 3e-3 and g["weight_decay"] == 0.0 for g in groups)
    # The same grouping from named parameters and from bare tensors in registration order.
    for source in (net.named_parameters(), net.parameters()):
        again = depth_param_groups(source, 0.5, -0.1)
        assert [[id(p) for p in g["params"]] for g in again] == [
            [id(p) for p in g["params"]] for g in groups
        ]
    opt = SMES(groups, backend="cpu")
    x = torch.randn(5, 6)
    net(x).square().mean().backward()
    opt.step()
    assert [g["exponent"] for g in opt.param_groups] == [g["exponent"] for g in groups]
    assert len(opt.state) == sum(len(g) for g in expect)


def test_depth_groups_rules_at_the_edges():
    # A norm before any weighted layer joins the first layer; one layer gets p_input.
    net = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.LayerNorm(4))
    (only,) = depth_param_groups(net, 0.2, -0.2)
    assert only["exponent"] == 0.2 and len(only["params"]) == 6
    # A tied weight counts once, at its first owner.
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    groups = depth_param_groups(nn.Sequential(emb, nn.Linear(4, 4), head), 0.0, 0.4)
    assert [len(g["params"]) for g in groups] == [1, 2]
    # No 2-D parameter anywhere: each owner is a layer.
    groups = depth_param_groups(nn.Sequential(nn.LayerNorm(3), nn.LayerNorm(3)), 0.0, 0.4)
    assert [g["exponent"] for g in groups] == [0.0, 0.4]
    with pytest.raises(ValueError, match="finite"):
        depth_param_groups(net, float("nan"), 0.1)
    with pytest.raises(TypeError, match="exponent"):
        depth_param_groups(net, 0.1, 0.1, exponent=0.3)
    with pytest.raises(ValueError, match="no parameters"):
        depth_param_groups(nn.ReLU(), 0.1, 0.1)


def test_depth_groups_take_a_schedule_per_group():
    groups = depth_param_groups(_net(), 0.5, -0.1)
    opt = SMES(groups)
    sched = LinearExponent(opt, start=0.5, end=None, total_steps=4)  # warm up to each depth's p
    for _ in range(4):
        sched.step()
    assert sched.get_last_exponent() == [g["exponent"] for g in groups]


# ------------------------------------------------------------------ no recompiles, no rebuilds


def _general_values(sched, steps):
    vals = []
    for _ in range(steps):
        vals.append(sched.get_last_exponent()[0])
        sched.step()
    return vals


def test_triton_changing_p_never_recompiles():
    """Under Triton's interpreter the kernels' cache is what the launches specialise on (their
    constexprs) plus the device tables (``K.CACHE``): after the first step neither grows while a
    schedule moves p through general values every step."""
    require("triton")
    params = _params(shapes=((33,), (4, 5), (7,)))
    opt = SMES(params, lr=1e-2, exponent=-0.3, backend="triton")
    sched = LinearExponent(opt, start=-0.3, end=0.37, total_steps=10)
    specialisations: set = set()
    K.LAUNCH_HOOKS.append(
        lambda consts, n, ptrs: specialisations.add(tuple(sorted(consts.items(), key=str)))
    )
    sizes, seen = [], []
    try:
        for t in range(10):
            _grads(params, t)
            seen.append(opt.param_groups[0]["exponent"])
            opt.step()
            sched.step()
            sizes.append((len(specialisations), len(K.CACHE.entries), K.CACHE.stats["builds"]))
    finally:
        K.LAUNCH_HOOKS.clear()
    assert len(set(seen)) == 10 and all(p not in (0.0, 0.5) for p in seen)  # general p only
    assert sizes[0][0] == 1 and all(s == sizes[0] for s in sizes), sizes
    ref = _params(shapes=((33,), (4, 5), (7,)))
    ro = SMES(ref, lr=1e-2, exponent=-0.3, backend="reference")
    rs = LinearExponent(ro, start=-0.3, end=0.37, total_steps=10)
    for t in range(10):
        _grads(ref, t)
        ro.step()
        rs.step()
    for a, b in zip(params, ref):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_changing_p_never_rebuilds_the_plan(monkeypatch):
    """The "cpu" backend keeps its buckets (and the C++-held fast bucket) in a plan built on the
    first step; a schedule over general p values must not rebuild it."""
    from smes_fused import optimizer as opt_mod

    require("cpu")
    builds = []
    real = opt_mod._Plan.__init__

    def counting(self, *a, **kw):
        builds.append(1)
        real(self, *a, **kw)

    monkeypatch.setattr(opt_mod._Plan, "__init__", counting)
    params = _params()
    opt = SMES(params, lr=1e-2, exponent=-0.3, backend="cpu")
    sched = CyclicExponent(opt, start=-0.3, end=0.37, period=4)
    plans = []
    for t in range(10):
        _grads(params, t)
        assert opt.param_groups[0]["exponent"] not in (0.0, 0.5)
        opt.step()
        sched.step()
        plans.append((opt._plan, opt._plan.fast))
    assert len(builds) == 1
    assert all(p == plans[0] for p in plans)
    assert plans[0][1] is not None  # the C++-kept bucket served every step


def test_scheduler_base_needs_a_closed_form():
    with pytest.raises(NotImplementedError):
        ExponentScheduler(_two_groups(), start=0.5, end=0.1)
