"""Drop-in fidelity: one regression test per defect found by trying SMES as an AdamW user would
(docs/SPEC.md §5). Each test failed before its fix."""

import copy
import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from oracle import host_backends

import smes_fused
from smes_fused import SMES

BACKENDS = host_backends()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _grads(ps, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)


def _params_and_state(ps, opt):
    return [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict())


def _assert_same(ps, opt, snap):
    params, sd = snap
    for p, b in zip(ps, params):
        assert torch.equal(p.detach(), b), "a rejected call changed a parameter"
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k, st in sd["state"].items():
        assert now["state"][k].keys() == st.keys()
        for name, t in st.items():
            assert torch.equal(now["state"][k][name], t), f"a rejected call changed {name}"


def _trained(backend, steps=2, **kw):
    ps = list(_net().parameters())
    opt = SMES(ps, backend=backend, **kw)
    for s in range(steps):
        _grads(ps, s)
        opt.step()
    _grads(ps, 100)
    return ps, opt


# 1 ---------------------------------------------------------------- a group given as a generator


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_params_given_as_generator_are_trained(backend):
    net = _net()
    opt = SMES([{"params": net.parameters(), "lr": 1e-2}], backend=backend)
    assert len(opt.param_groups[0]["params"]) == 4
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("kw", [dict(foreach=False), dict(fused=True), dict(differentiable=False)])
def test_adamw_implementation_keywords_are_taken(kw):
    """``AdamW(..., fused=True)`` → ``SMES(..., fused=True)`` runs unchanged (these were
    unexpected keywords); the step is SMES's whatever they say, and the groups keep them for an
    AdamW that loads the state dict."""
    ps, ref = list(_net().parameters()), list(_net().parameters())
    opt, plain = SMES(ps, **kw), SMES(ref)
    for s in range(3):
        _grads(ps, s), _grads(ref, s)
        opt.step(), plain.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, ref))
    for k, v in kw.items():
        assert opt.state_dict()["param_groups"][0][k] == v
    with pytest.raises(NotImplementedError, match="differentiable"):
        SMES(ps, differentiable=True)
    with pytest.raises(TypeError, match="fused"):
        SMES(ps, fused="yes")
    for bad in (1, 0, 1.0):  # equal to True/False, but not what SPEC §5 accepts
        with pytest.raises(TypeError, match="foreach"):
            SMES(ps, foreach=bad)


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_grad_scaler_step_without_grads_of_this_optimizer(max_grad_norm):
    """GradScaler.step on an optimizer none of whose params got a gradient (a frozen or unused
    sub-model, a second optimizer): the scaler sets ``found_inf`` to ``sum([])``, the int 0, and
    fused AdamW takes the step (a no-op); SMES refused that int as a bad found_inf."""
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt, other = SMES([p], max_grad_norm=max_grad_norm), torch.optim.SGD([q], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((q * 2).sum()).backward()
    scaler.step(other)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state
    p.grad = torch.ones(3)  # and the next step with a grad runs
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3))


def test_adamw_positional_arguments_and_numpy_numbers():
    """AdamW's positional order (params, lr, betas, eps, weight_decay, amsgrad): the sixth is
    amsgrad (it was the exponent, so True failed as one); numpy numbers are taken as AdamW takes
    them (np.float32 was refused, np.float64 taken) and the groups SMES makes hold Python
    numbers, so that the checkpoint loads with torch.load(weights_only=True)."""
    import io

    import numpy as np

    ps = list(_net().parameters())
    opt = SMES(ps, 1e-3, (0.9, 0.999), 1e-8, 1e-2, True)
    assert opt.param_groups[0]["amsgrad"] is True and opt.param_groups[0]["exponent"] == 0.5
    opt = SMES(ps, lr=np.float32(1e-3), betas=(np.float64(0.9), np.float32(0.999)),
               eps=np.float64(1e-8), weight_decay=np.float32(0.01), exponent=np.float32(-0.08),
               max_grad_norm=np.float32(1.0))  # fmt: skip
    g = opt.param_groups[0]
    for k in ("lr", "eps", "weight_decay", "exponent"):
        assert type(g[k]) is float, k
    assert all(type(b) is float for b in g["betas"]) and type(opt.max_grad_norm) is float
    _grads(ps, 0)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    with pytest.raises(TypeError, match="tensor is taken for lr only"):
        SMES(ps, betas=(torch.tensor(0.9), 0.999))


def test_numpy_flags_and_strings_are_taken_as_python_values():
    """np.True_ flags are taken as AdamW takes them (they were refused: "expected True or
    False"), and a numpy string option is kept as a Python str (np.str_ was kept, and the
    checkpoint then failed to load with weights_only=True), also when set by hand later."""
    import io

    import numpy as np

    ps = list(_net().parameters())
    torch.optim.AdamW(ps, amsgrad=np.True_, maximize=np.False_)  # what torch accepts
    opt = SMES(ps, amsgrad=np.True_, maximize=np.False_, rectify=np.True_, projection=np.True_,
               stochastic_rounding=np.False_, second_moment=np.str_("sum"),
               rounding_seed=np.int64(7))  # fmt: skip
    g = opt.param_groups[0]
    for k in ("amsgrad", "maximize", "rectify", "projection", "stochastic_rounding"):
        assert type(g[k]) is bool, k
    assert type(g["second_moment"]) is str and type(g["rounding_seed"]) is int
    _grads(ps, 0)
    opt.step()
    g["amsgrad"] = np.True_  # by hand: taken, and stored back as a bool
    g["rectify"] = np.False_
    g["second_moment"] = np.str_("ema")
    _grads(ps, 1)
    opt.step()
    assert g["amsgrad"] is True and g["rectify"] is False and type(g["second_moment"]) is str
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    with pytest.raises(TypeError, match="Invalid amsgrad"):
        SMES(ps, amsgrad=np.int64(1))  # a number is not a flag, numpy or not


@pytest.mark.parametrize(
    "key, value, exc",
    [("amsgrad", "no", TypeError), ("maximize", None, TypeError), ("capturable", "yes", TypeError),
     ("foreach", "x", TypeError), ("differentiable", True, NotImplementedError)],
)  # fmt: skip
def test_loaded_group_flags_are_checked_as_the_constructor_checks_them(key, value, exc):
    """A state dict whose group holds a flag the constructor refuses: refused by
    load_state_dict with nothing changed (it was loaded, "no" read as True)."""
    ps, opt = _trained("cpu")
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0][key] = value
    snap = _params_and_state(ps, opt)
    with pytest.raises(exc, match=key):
        opt.load_state_dict(sd)
    _assert_same(ps, opt, snap)
    assert opt.param_groups[0][key] == snap[1]["param_groups"][0][key]
    with pytest.raises(exc, match=key):
        SMES(ps, **{key: value})


def test_group_params_given_as_set_are_rejected():
    with pytest.raises(TypeError, match="not a set"):
        SMES([{"params": set(_net().parameters())}])


# 2 ---------------------------------------------------------------- deepcopy and pickle


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_backend_and_step_identically(backend, how):
    ps, opt = _trained(backend, exponent=-0.08)
    blob = copy.deepcopy((ps, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((ps, opt)))
    qs, opt2 = blob
    assert opt2.backend == backend
    for q, p in zip(qs, ps):
        q.grad = p.grad.clone()
    opt.step()
    opt2.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


# 3 ---------------------------------------------------------------- step as a Python number


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_with_number_steps_loads_and_continues(backend):
    ps, opt = _trained(backend)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = int(st["step"].item())  # torch < 1.12 saved steps so
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = SMES(qs, backend=backend)
    opt2.load_state_dict(sd)
    assert all(opt2.state[q]["step"].dtype == torch.float32 for q in qs)
    for s in range(3):
        _grads(ps, 10 + s)
        _grads(qs, 10 + s)
        opt.step()
        opt2.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["step"], opt2.state[q]["step"])


# 4 ---------------------------------------------------------------- tensor lr of any shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_tensor_lr_of_any_one_element_shape(backend, shape):
    ps = list(_net().parameters())
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = SMES(ps, lr=torch.full(shape, 1e-2), backend=backend)
    ref = SMES(qs, lr=1e-2, backend=backend)
    for s in range(3):
        _grads(ps, s)
        _grads(qs, s)
        opt.step()
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q)


def test_tensor_lr_with_two_elements_is_rejected_at_construction():
    with pytest.raises(ValueError, match=r"1-element float tensor, got shape \(2,\)"):
        SMES(list(_net().parameters()), lr=torch.tensor([1e-3, 1e-3]))


# 5 ---------------------------------------------------------------- grads checked on every step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "bad, exc, words",
    [
        (lambda p: torch.randn(1), ValueError, "gradient shape"),
        (lambda p: torch.randn(p.shape[::-1]), ValueError, "gradient shape"),
        (lambda p: torch.randn(p.shape, dtype=torch.float64), TypeError, "gradient dtype"),
    ],
)
def test_mismatched_grad_after_the_first_step_mutates_nothing(backend, bad, exc, words):
    ps, opt = _trained(backend)
    snap = _params_and_state(ps, opt)
    ps[0].grad.data = bad(ps[0])  # autograd refuses `.grad = `, `.grad.data =` gets through
    with pytest.raises(exc, match=words):
        opt.step()
    _assert_same(ps, opt, snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_resized_through_data_mutates_nothing(backend):
    """A param resized through ``.data`` after a step no longer fits its state: the step is
    refused with nothing written (reference and foreach stepped the first param and its count,
    then failed with a broadcast error)."""
    ps, opt = _trained(backend)
    ps[2].data = torch.randn(5, 3)
    ps[2].grad = torch.randn(5, 3)
    snap = _params_and_state(ps, opt)
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        opt.step()
    _assert_same(ps, opt, snap)


@pytest.mark.parametrize("resized", [0, 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_param_resized_in_one_of_two_buckets_mutates_nothing(backend, resized):
    """The same with two buckets (a float32 and a bf16 param): every bucket's state is checked
    before any bucket is stepped (each backend checked its own bucket, so the float32 param and
    its count were stepped before the bf16 bucket was refused)."""
    torch.manual_seed(0)
    ps = [torch.randn(4, requires_grad=True), torch.randn(3, dtype=torch.bfloat16).requires_grad_()]
    opt = SMES(ps, lr=0.1, exponent=-0.08, backend=backend)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    ps[resized].data = torch.randn(5, dtype=ps[resized].dtype)
    for p in ps:
        p.grad = torch.ones_like(p)
    snap = _params_and_state(ps, opt)
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        opt.step()
    _assert_same(ps, opt, snap)


_WITH_TRITON = BACKENDS + (
    ["triton"] if smes_fused.available_backends().get("triton") is None else []
)


@pytest.mark.parametrize(
    "second", [{"amsgrad": True}, {"exponent": 0.0}, {"exponent": 0.5}], ids=str
)
@pytest.mark.parametrize("backend", _WITH_TRITON)
def test_refusal_in_a_later_launch_of_one_bucket_mutates_nothing(backend, second):
    """One bucket whose groups differ in state kind (amsgrad, p = 0) or variant (p): "cpu" applies
    it in one launch per state kind and "triton" in one per variant, and each checked only what
    it launched, so a param resized in the second group was refused after the first group had
    been stepped. Every launch is checked before any now."""
    torch.manual_seed(0)
    a, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    opt = SMES([{"params": [a]}, {"params": [b], **second}], lr=0.1, exponent=-0.08,
               backend=backend)  # fmt: skip
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    b.data = torch.randn(6)
    for p in (a, b):
        p.grad = torch.ones_like(p)
    snap = _params_and_state([a, b], opt)
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        opt.step()
    _assert_same([a, b], opt, snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_of_another_dtype_in_a_later_bucket_mutates_nothing(backend):
    """A float64 exp_avg_sq beside a float32 exp_avg (the fused kernels refuse it) in the second
    of two buckets: refused before the first bucket is stepped ("cpu" stepped the float32 param
    first), and a clipped step keeps the last grad_norm (the refused step had replaced it)."""
    a = torch.nn.Parameter(torch.ones(5))
    b = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.bfloat16))
    opt = SMES([a, b], lr=0.1, backend=backend, max_grad_norm=1.0)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    norm = opt.grad_norm
    opt.state[b]["exp_avg_sq"] = opt.state[b]["exp_avg_sq"].double()
    a.grad, b.grad = torch.full_like(a, 3.0), torch.full_like(b, 3.0)
    snap = _params_and_state([a, b], opt)
    with pytest.raises(ValueError, match="exp_avg_sq .* dtype torch.float64"):
        opt.step()
    _assert_same([a, b], opt, snap)
    assert opt.grad_norm is norm


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_replaced_in_its_groups_list_is_the_one_stepped(backend):
    """``param_groups[0]["params"][i] = new`` (the same list, the same length): the next step
    steps the new param and makes its state, as AdamW does; the old one, out of the optimizer,
    stays put (SMES kept its cached buckets and stepped the old tensor with the new one's
    gradient)."""
    torch.manual_seed(0)
    a, b, c = (torch.randn(5, requires_grad=True) for _ in range(3))
    opt = SMES([a, b], backend=backend)
    a.grad, b.grad = torch.ones(5), torch.ones(5)
    opt.step()
    opt.param_groups[0]["params"][1] = c
    a.grad, b.grad, c.grad = torch.ones(5), None, torch.ones(5)
    b0, c0 = b.detach().clone(), c.detach().clone()
    opt.step()
    assert torch.equal(b, b0) and not torch.equal(c, c0)
    assert float(opt.state[c]["step"]) == 1 and float(opt.state[a]["step"]) == 2


# 6 ---------------------------------------------------------------- load_state_dict content


def test_load_sgd_state_dict_is_rejected():
    ps = list(_net().parameters())
    sgd = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    _grads(ps, 0)
    sgd.step()
    ps, opt = _trained("auto")
    snap = _params_and_state(ps, opt)
    with pytest.raises(ValueError, match="not a state dict of SMES, AdamW or Adam"):
        opt.load_state_dict(sgd.state_dict())
    _assert_same(ps, opt, snap)
    # the same state under Adam-like group keys is still caught by its content
    sd = sgd.state_dict()
    sd["param_groups"][0].update(betas=(0.9, 0.999), eps=1e-8)
    with pytest.raises(ValueError, match=r"has no \['step', 'exp_avg', 'exp_avg_sq'\]"):
        opt.load_state_dict(sd)
    _assert_same(ps, opt, snap)


@pytest.mark.parametrize("drop", ["step", "exp_avg", "exp_avg_sq"])
def test_load_state_without_a_required_entry_is_rejected(drop):
    ps, opt = _trained("auto")
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][1][drop]
    snap = _params_and_state(ps, opt)
    with pytest.raises(ValueError, match=f"has no \\['{drop}'\\]"):
        opt.load_state_dict(sd)
    _assert_same(ps, opt, snap)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled extension")
def test_load_state_the_backend_cannot_run_is_rejected_at_load():
    ps, opt = _trained("cpu")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].double()
    snap = _params_and_state(ps, opt)
    with (
        pytest.warns(UserWarning, match="rather than downcasting"),
        pytest.raises(ValueError, match="cannot be stepped.*backend 'cpu'.*torch.float64"),
    ):
        opt.load_state_dict(sd)
    _assert_same(ps, opt, snap)
    # "foreach" runs float64 state: it loads, and both state tensors of a param share a dtype
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = SMES(qs, backend="foreach")
    with pytest.warns(UserWarning, match="rather than downcasting"):
        opt2.load_state_dict(sd)
    st = opt2.state[qs[0]]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float64
    _grads(qs, 0)
    opt2.step()


# 7 ---------------------------------------------------------------- grad_scale / found_inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kw, exc, words",
    [
        (dict(found_inf=torch.tensor([0.0, 1.0])), ValueError, "found_inf: expected a 1-element"),
        (dict(grad_scale=torch.tensor([2.0, 4.0])), ValueError, "grad_scale: expected a 1-el"),
        (dict(found_inf=0.0), TypeError, "found_inf: 0.0"),
        (dict(grad_scale=2.0), TypeError, "grad_scale: 2.0"),
        (dict(grad_scale=torch.tensor(2)), ValueError, "grad_scale: .*dtype torch.int64"),
    ],
)
def test_bad_grad_scale_or_found_inf_mutates_nothing(backend, kw, exc, words):
    ps, opt = _trained(backend)
    snap = _params_and_state(ps, opt)
    with pytest.raises(exc, match=words):
        opt.step(**kw)
    _assert_same(ps, opt, snap)


# 8 ---------------------------------------------------------------- the same parameter twice


def test_same_parameter_twice_in_a_group_is_rejected():
    w = torch.randn(3, 2, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"more than once, at positions 0 and 2"):
        SMES([w, b, w])
    opt = SMES([b])
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [w, w]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["again in its group", "in another group", "replacing another"])
def test_same_parameter_twice_by_editing_param_groups_is_rejected(backend, how):
    """param_groups edited by hand after construction: a param there twice is refused at the
    step, which changes nothing (it was taken: "cpu" updated the moments twice and the step count
    once, and with 2 threads raced on the elements)."""
    ps = list(_net().parameters())
    opt = SMES([{"params": ps[:2]}, {"params": ps[2:]}], backend=backend)
    _grads(ps, 0)
    opt.step()
    _grads(ps, 1)
    if how == "again in its group":
        opt.param_groups[0]["params"].append(ps[0])
    elif how == "in another group":
        opt.param_groups[1]["params"].append(ps[0])
    else:
        opt.param_groups[1]["params"][0] = ps[0]
    params = [p.detach().clone() for p in ps]
    state = [{k: t.clone() for k, t in opt.state[p].items()} for p in ps]
    where = "0 at position 2" if how == "again in its group" else "1 at position"
    with pytest.raises(ValueError, match=rf"parameter \(shape \(3, 4\)\) is in param group 0 at "
                       rf"position 0 and in param group {where}"):  # fmt: skip
        opt.step()
    for p, b, st in zip(ps, params, state, strict=True):
        assert torch.equal(p.detach(), b)
        assert opt.state[p].keys() == st.keys()
        assert all(torch.equal(opt.state[p][k], t) for k, t in st.items())


def test_betas_given_as_a_list_are_kept_as_a_tuple_as_adamw_does():
    w = torch.zeros(2, requires_grad=True)
    assert SMES([w], betas=[0.9, 0.99]).param_groups[0]["betas"] == (0.9, 0.99)
    assert torch.optim.AdamW([w], betas=[0.9, 0.99]).param_groups[0]["betas"] == (0.9, 0.99)


# 9 ---------------------------------------------------------------- load-state-dict pre-hooks


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_pre_hook_result_is_what_gets_loaded(backend):
    ps, opt = _trained(backend)
    sd = opt.state_dict()
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = SMES(qs, backend=backend)
    seen = []

    def halve(optimizer, state_dict):
        edited = copy.deepcopy(state_dict)
        for st in edited["state"].values():
            st["exp_avg"] = st["exp_avg"] / 2
        return edited

    opt2.register_load_state_dict_pre_hook(halve)
    opt2.register_load_state_dict_post_hook(
        lambda o: seen.append(o.state[qs[0]]["exp_avg"].clone())
    )
    opt2.load_state_dict(sd)
    for i, q in enumerate(qs):
        assert torch.equal(opt2.state[q]["exp_avg"], sd["state"][i]["exp_avg"] / 2)
    assert torch.equal(seen[0], sd["state"][0]["exp_avg"] / 2), "post-hook sees the loaded state"


# 10 --------------------------------------------------------------- unusable backends, early


def _run(code: str, **env) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_triton_without_gpu_is_reported_unavailable_and_at_construction():
    r = _run(
        "import torch, smes_fused\n"
        "why = smes_fused.available_backends()['triton']\n"
        "print('WHY', why)\n"
        "try:\n"
        "    smes_fused.SMES([torch.zeros(2, requires_grad=True)], backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    assert r.returncode == 0, r.stderr
    assert "WHY no CUDA device is visible" in r.stdout
    assert "RAISED backend 'triton' is not available: no CUDA device" in r.stdout


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks a CPU-only torch")
def test_cuda_backend_reason_names_the_failed_build_condition():
    why = smes_fused.available_backends()["cuda"]
    assert why is not None and "CPU-only build" in why and "no rebuild can add them" in why
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*CPU-only"):
        SMES(list(_net().parameters()), backend="cuda")


# 11 --------------------------------------------------------------- an lr rule across p


@pytest.mark.parametrize(
    "args", [(float("nan"),), (float("inf"),), (True,), (0.5, float("inf")), (0.5, 0.0), (200.0,)]
)
def test_lr_for_exponent_rejects_what_is_no_lr(args):
    """(nan gave nan, inf 0, True 1e-5: the error then blamed the lr)"""
    with pytest.raises(ValueError, match="lr_for_exponent"):
        smes_fused.lr_for_exponent(*args)


def test_lr_for_exponent_anchors_and_the_quick_start():
    lr = smes_fused.lr_for_exponent
    assert lr(0.5) == pytest.approx(1e-3)
    assert lr(0.5, adamw_lr=3e-4) == pytest.approx(3e-4)
    assert lr(0.0) == pytest.approx(1e-1)  # SGD scale: adamw_lr / typical_grad
    assert lr(0.0, typical_grad=1e-3) == pytest.approx(1.0)
    assert lr(-0.08) > lr(0.0) > lr(0.25) > lr(0.5)
    # The README quick start trains at p = -0.08 with this lr (it barely moved at 1e-3).
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 32)
    x = torch.randn(256, 32)
    y = x @ torch.randn(32, 32) / 6
    losses = {}
    for name, rate in (("rule", lr(-0.08)), ("adamw_lr", 1e-3)):
        m = copy.deepcopy(model)
        opt = SMES(m.parameters(), lr=rate, weight_decay=1e-2, exponent=-0.08)
        for _ in range(100):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            opt.step()
        losses[name] = loss.item()
    first = torch.nn.functional.mse_loss(model(x), y).item()
    assert losses["rule"] < 0.3 * first, losses
    assert losses["adamw_lr"] > 0.8 * first, losses  # why the rule is needed


# 12 --------------------------------------------------------------- runs never overwrite results


def test_default_outputs_go_to_an_ignored_folder():
    from bench.cli import parse_args
    from smes_fused.sweep import build_parser

    outs = {parse_args([]).out, build_parser().parse_args([]).out}
    for out in outs:
        out = os.path.join(ROOT, out)  # relative to where the command runs: the repo root
        assert not out.startswith(os.path.join(ROOT, "results"))
        probe = os.path.join(out, "bench_cpu.csv")
        r = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
        assert r.returncode == 0, f"{probe} is not ignored by git"


# 14 --------------------------------------------------------------- the contract is in the repo


def test_every_spec_section_cited_exists_in_docs_spec():
    import re

    spec = open(os.path.join(ROOT, "docs", "SPEC.md")).read()
    sections = set(re.findall(r"^## (\d+)\.", spec, flags=re.M))
    cited = set()
    for folder in ("smes_fused", "triton_kernels", "bench", "tests", "csrc"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith((".py", ".cpp", ".cu", ".h")):
                    cited |= set(re.findall(r"SPEC §(\d+)", open(os.path.join(dirpath, f)).read()))
    readme = open(os.path.join(ROOT, "README.md")).read()
    cited |= set(re.findall(r"SPEC(?:\.md)?\)? §(\d+)", readme))
    assert cited and cited <= sections, f"cited {sorted(cited)}, present {sorted(sections)}"
    assert "docs/SPEC.md" in readme
    assert "shared folder" not in readme


# pre-hooks run once, in order (a hook's edit is seen by the next one)


def test_load_pre_hooks_run_once_in_order():
    ps, opt = _trained("auto")
    calls = []

    def hook(name):
        def f(optimizer, state_dict):
            calls.append(name)
            return OrderedDict(state_dict)

        return f

    opt.register_load_state_dict_pre_hook(hook("a"))
    opt.register_load_state_dict_pre_hook(hook("b"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["a", "b"]


# 13 --------------------------------------------------------------- a build that lacks its tools


@pytest.mark.parametrize(
    "command, hide, words",
    [
        ("dist_info", "wheel", "wheel (or setuptools >= 70.1; this one is 65.5.0)"),
        ("bdist_wheel", "torch", "torch (the C++ extension is built against the torch"),
    ],
)
def test_build_without_isolation_names_what_is_missing(command, hide, words):
    """`pip install --no-build-isolation .` in a bare venv failed with setuptools' `invalid
    command 'bdist_wheel'`; setup.py now says what to install, before setuptools runs."""
    code = (
        "import sys, setuptools\n"
        f"sys.modules[{hide!r}] = None\n"  # import of it fails, as in a bare venv
        "setuptools.__version__ = '65.5.0'\n"
        f"sys.argv = ['setup.py', {command!r}]\n"
        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__file__': 'setup.py'})\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0
    assert "smes-fused: building without build isolation needs" in r.stderr
    assert words in r.stderr
