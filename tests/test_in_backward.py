"""SMES in backward (smes_fused.in_backward): the same results as ``loss.backward();
opt.step()`` on every backend, gradients freed by backward, lr and exponent schedulers, state
dicts in SMES's format both ways, and the errors for what it cannot do."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from _backends import require, use_triton_interpreter
from torch import nn
from torch.optim import lr_scheduler
from torch.testing import assert_close

from smes_fused import SMES, CosineExponent, _ops, depth_param_groups
from smes_fused.in_backward import InBackwardSMES, attach

use_triton_interpreter()
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")

BACKENDS = ["reference", "foreach", "cpu", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return require(request.param)


class Net(nn.Module):
    """Linear layers with a norm, a frozen layer and a layer unused by forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.hidden = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 3)  # never in forward: its grads stay None
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.norm(self.inp(x)))
        h = torch.relu(self.hidden(self.frozen(h)))
        return self.out(h)


def _batch(t: int):
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)


def _loss(model, t):
    x, y = _batch(t)
    return nn.functional.mse_loss(model(x), y)


def _pair(backend, bucket_size_bytes, **kw):
    a, b = Net(), Net()
    kw = dict(lr=1e-2, exponent=-0.08, backend=backend) | kw
    groups_a = depth_param_groups(a, 0.5, -0.08)
    groups_b = depth_param_groups(b, 0.5, -0.08)
    kw.pop("exponent")
    return a, attach(groups_a, bucket_size_bytes, **kw), b, SMES(groups_b, **kw)


def _check_same(a, oa, b, ob):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert_close(p, q, msg=name)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for name in sa["state"][k]:
            assert_close(sa["state"][k][name], sb["state"][k][name])


@pytest.mark.parametrize("bucket", [0, 700, 1 << 20], ids=["per-param", "small", "one-bucket"])
def test_equals_backward_then_step(backend, bucket):
    a, oa, b, ob = _pair(backend, bucket)
    n_buckets = len(oa._buckets)  # 10 params require grad (2 of them unused by forward)
    assert (
        n_buckets == 10 if bucket == 0 else n_buckets == 1 if bucket == 1 << 20 else n_buckets > 1
    )
    for t in range(4):
        _loss(a, t).backward()
        assert all(p.grad is None for p in a.parameters())  # freed by the steps in backward
        assert float(oa.state[a.out.weight]["step"]) == t + 1  # stepped before opt.step()
        oa.step()
        oa.zero_grad()
        _loss(b, t).backward()
        ob.step()
        ob.zero_grad()
    _check_same(a, oa, b, ob)
    assert a.unused.weight not in oa.state and a.frozen.weight not in oa.state


def test_stochastic_rounding_equals_backward_then_step(backend):
    """bf16 params rounded stochastically: the steps in backward draw SMES's noise bit for bit
    (each param's seed comes from its place in the optimizer; it came from its place in its
    bucket's worker, which differs, and so did 40% of the elements)."""
    nets, opts = [], []
    for in_backward in (True, False):
        net = Net().bfloat16()
        groups = depth_param_groups(net, 0.5, -0.08)
        kw = dict(lr=1e-2, backend=backend, stochastic_rounding=True, rounding_seed=3)
        opts.append(attach(groups, 700, **kw) if in_backward else SMES(groups, **kw))
        nets.append(net)
    for t in range(3):
        x, y = (z.bfloat16() for z in _batch(t))
        for net, opt in zip(nets, opts):
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16)), name


def test_lr_and_exponent_schedulers_on_the_handle():
    a, oa, b, ob = _pair("cpu", 700)
    sa = [
        lr_scheduler.StepLR(oa, step_size=2, gamma=0.5),
        CosineExponent(oa, end=0.1, total_steps=3),
    ]
    sb = [
        lr_scheduler.StepLR(ob, step_size=2, gamma=0.5),
        CosineExponent(ob, end=0.1, total_steps=3),
    ]
    for t in range(5):
        _loss(a, t).backward()
        oa.step()
        _loss(b, t).backward()
        ob.step()
        ob.zero_grad()
        for s in sa + sb:
            s.step()
        assert [g["lr"] for g in oa.param_groups] == [g["lr"] for g in ob.param_groups]
    assert sa[0].get_last_lr()[0] == pytest.approx(1e-2 * 0.25)
    assert sa[1].get_last_exponent() == [0.1] * len(oa.param_groups)
    _check_same(a, oa, b, ob)


def test_state_dict_round_trips_with_plain_smes():
    a, oa, b, ob = _pair("cpu", 700)
    for t in range(2):
        _loss(a, t).backward()
        oa.step()
        _loss(b, t).backward()
        ob.step()
        ob.zero_grad()
    # In-backward state into a plain SMES, plain SMES state into a fresh in-backward one: both
    # continue as the runs they came from.
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    plain = SMES(depth_param_groups(a2, 0.5, -0.08), lr=1e-2, backend="cpu")
    plain.load_state_dict(oa.state_dict())
    inb = attach(depth_param_groups(b2, 0.5, -0.08), 700, lr=1e-2, backend="cpu")
    inb.load_state_dict(ob.state_dict())
    for t in range(2, 4):
        for model, opt in ((a, oa), (b, ob), (a2, plain), (b2, inb)):
            _loss(model, t).backward()
            opt.step()
            opt.zero_grad()
    for x, y, z, w in zip(a.parameters(), b.parameters(), a2.parameters(), b2.parameters()):
        assert_close(x, y)
        assert_close(z, x)
        assert_close(w, x)
    _check_same(a2, plain, b2, inb)


def test_gradient_accumulation_is_refused():
    model = Net()
    opt = attach(model, 700, lr=1e-2, backend="cpu")
    _loss(model, 0).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="accumulation over micro-batches"):
        _loss(model, 1).backward()  # a second micro-batch before opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # nothing stepped twice
    assert float(opt.state[model.out.weight]["step"]) == 1


def test_a_refused_backward_leaves_the_optimizer_usable():
    """The refused micro-batch's gradient is dropped, so step() ends the iteration and the next
    one trains as usual (the gradient stayed in .grad, step() then raised forever, and every
    later backward was refused too)."""
    a, oa, b, ob = _pair("cpu", 700)
    _loss(a, 0).backward()
    with pytest.raises(RuntimeError, match="accumulation over micro-batches"):
        _loss(a, 1).backward()
    oa.step()
    oa.zero_grad()
    assert all(p.grad is None for p in a.parameters())
    _loss(b, 0).backward()
    ob.step()
    ob.zero_grad()
    for t in (2, 3):
        for net, opt in ((a, oa), (b, ob)):
            _loss(net, t).backward()
            opt.step()
            opt.zero_grad()
    _check_same(a, oa, b, ob)


def test_a_backward_refused_for_a_bad_hyperparameter_drops_its_gradient():
    """An lr made invalid after attach: the backward is refused with nothing stepped and its
    gradient dropped (it stayed in .grad and the next iteration trained on twice its gradient),
    so once the lr is fixed the iterations equal SMES's."""
    a, oa, b, ob = _pair("cpu", 0)
    for g in oa.param_groups:
        g["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate"):
        _loss(a, 0).backward()
    assert all(p.grad is None for p in a.parameters()) and not oa.state
    for g in oa.param_groups:
        g["lr"] = 1e-2
    for t in (1, 2):
        for net, opt in ((a, oa), (b, ob)):
            _loss(net, t).backward()
            opt.step()
            opt.zero_grad()
    _check_same(a, oa, b, ob)


def test_a_second_attach_to_the_same_params_is_refused_until_detach():
    """attach() to parameters another SMES in backward still hooks: refused (the first one's
    hooks stepped the parameters and freed their gradients, so the second never stepped and
    silently ignored its state and settings). After detach(), or once the first is dropped,
    attach works."""
    model = Net()
    first = attach(model, lr=1e-2, backend="cpu")
    with pytest.raises(RuntimeError, match="attached to another SMES in backward"):
        attach(model, lr=1e-3, backend="cpu")
    first.detach()
    second = attach(model, lr=1e-3, backend="cpu")
    _loss(model, 0).backward()
    second.step()
    assert float(second.state[model.out.weight]["step"]) == 1 and not first.state
    del second
    import gc

    gc.collect()
    third = attach(model, lr=1e-3, backend="cpu")  # the dropped one steps nothing
    _loss(model, 1).backward()
    third.step()
    assert float(third.state[model.out.weight]["step"]) == 1


def test_backwards_over_disjoint_params_of_one_bucket():
    """Two losses over disjoint parameters, each backward once, then step(): one SMES step of
    every parameter, whatever the bucket size (with both in one bucket, the first backward's
    end stepped the bucket and the second was refused as a second micro-batch)."""
    results = []
    for bucket in (None, 0, 1 << 20):
        torch.manual_seed(0)
        first, second = nn.Linear(4, 3), nn.Linear(4, 2)
        params = [*first.parameters(), *second.parameters()]
        kw = dict(lr=1e-2, exponent=-0.08, backend="cpu")
        opt = SMES(params, **kw) if bucket is None else attach(params, bucket, **kw)
        for t in range(2):
            x = torch.randn(5, 4, generator=torch.Generator().manual_seed(t))
            first(x).square().sum().backward()
            second(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in params])
    for other in results[1:]:
        for p, q in zip(results[0], other):
            assert torch.equal(p, q)


def test_one_backward_per_step_works_again_after_step():
    model = Net()
    opt = attach(model, 700, lr=1e-2, backend="cpu")
    for t in range(3):
        _loss(model, t).backward()
        opt.step()
    assert float(opt.state[model.out.weight]["step"]) == 3


def test_what_it_cannot_do_raises_with_the_reason():
    with pytest.raises(ValueError, match="global gradient norm"):
        attach(Net(), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="bucket_size_bytes"):
        attach(Net(), -1)
    with pytest.raises(ValueError, match="amp_unscale='scaler'"):  # GradScaler's unscale_ would
        attach(Net(), amp_unscale="scaler")  # find no grads and the iteration never end
    opt = attach(Net(), backend="cpu")
    with pytest.raises(RuntimeError, match="GradScaler"):
        opt.step(grad_scale=torch.ones(()), found_inf=torch.zeros(()))
    model = Net()
    opt = attach(model, backend="cpu")
    opt.max_grad_norm = 1.0  # set after attach: refused before anything is stepped
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="global gradient norm"):
        _loss(model, 0).backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())  # none left for a later step
    with pytest.raises(ValueError, match="global gradient norm"):
        opt.step()
    with pytest.raises(RuntimeError, match="after attach"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(opt)


def test_grad_scaler_is_refused_and_the_next_iteration_runs():
    """torch.amp.GradScaler: step() refuses (the parameters were stepped in backward, on the
    scaled gradients), and then leaves neither the scaler's grad_scale/found_inf on the
    optimizer nor an unfinished iteration: the next one trains without the scaler (before, both
    its backward and its step raised)."""
    model = Net()
    opt = attach(model, 700, lr=1e-2, backend="cpu")
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(_loss(model, 0)).backward()
    with pytest.raises(RuntimeError, match="scaled gradients"):
        scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert all(p.grad is None for p in model.parameters())
    steps = float(opt.state[model.out.weight]["step"])
    _loss(model, 1).backward()
    opt.step()
    assert float(opt.state[model.out.weight]["step"]) == steps + 1


def test_grads_set_by_hand_and_detach_step_as_smes():
    a, oa, b, ob = _pair("cpu", 700)
    for p, q in zip(a.parameters(), b.parameters()):
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.5)  # no hook sees these
            q.grad = torch.full_like(q, 0.5)
    oa.step()
    ob.step()
    ob.zero_grad()
    assert all(p.grad is None for p in a.parameters())
    oa.detach()
    for t in range(2):
        _loss(a, t).backward()
        assert a.out.weight.grad is not None  # no longer stepped in backward
        oa.step()
        _loss(b, t).backward()
        ob.step()
        ob.zero_grad()
    _check_same(a, oa, b, ob)


def test_zero_grad_is_a_no_op_and_the_handle_is_an_smes():
    model = Net()
    opt = attach(model, backend="cpu")
    assert isinstance(opt, InBackwardSMES) and isinstance(opt, SMES)
    _loss(model, 0).backward()
    opt.zero_grad()
    opt.zero_grad(set_to_none=False)
    opt.step()
    assert all(p.grad is None for p in model.parameters())


def test_bench_script_runs_and_shows_the_saving(tmp_path, capsys):
    import csv

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from bench import in_backward as bench

    bench.main(
        ["--models", "mlp", "--width", "256", "--depth", "3", "--batch", "4", "--steps", "1",
         "--bucket-mb", "0", "--out", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "in-backward 0 MiB" in out and "peak MB" in out
    with open(tmp_path / "in_backward_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == bench.COLUMNS
    usual, inb = rows
    assert usual["mode"] == "usual" and inb["mode"] == "in_backward"
    # the backend that ran, not "auto" (the README quotes it)
    want = "cpu" if _ops.HAVE_C else "foreach"
    assert usual["backend"] == inb["backend"] == want
    assert f"SMES backend {want}," in out
    grads = int(usual["grad_bytes"])  # 4 layers of 256x256 + biases
    assert int(usual["rise_bytes"]) >= grads  # every gradient lives at the end of backward
    assert int(inb["rise_bytes"]) < grads / 2  # about one layer's at a time
    assert int(inb["saved_vs_usual_bytes"]) > grads / 2
