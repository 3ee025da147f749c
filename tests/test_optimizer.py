"""State layout, checkpoints (SMES and AdamW/Adam interop) and bad input (SPEC §2, §5)."""

import copy
import io
import math

import pytest
import torch
from oracle import host_backends

import smes_fused
from smes_fused import functional

BACKENDS = host_backends()


def _model(seed=0):
    torch.manual_seed(seed)
    return [torch.randn(9, 4, requires_grad=True), torch.randn(4, requires_grad=True)]


def _grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def _snapshot(ps, opt):
    return (
        [p.detach().clone() for p in ps],
        copy.deepcopy(opt.state_dict()),
    )


def _assert_unchanged(ps, opt, snap):
    params, sd = snap
    for p, b in zip(ps, params):
        assert torch.equal(p.detach(), b), "a rejected call changed a parameter"
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys(), "a rejected call changed the state keys"
    for k, st in sd["state"].items():
        for name, t in st.items():
            assert torch.equal(now["state"][k][name], t), f"a rejected call changed {name}"
    for g_now, g_old in zip(now["param_groups"], sd["param_groups"]):
        assert g_now == g_old


# ------------------------------------------------------------------ state (SPEC §2)


def test_state_uses_torch_names_and_types():
    ps = _model()
    opt = smes_fused.SMES(ps, amsgrad=True)
    _grads(ps, 1)
    opt.step()
    st = opt.state[ps[0]]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert st["step"].dtype == torch.float32 and st["step"].dim() == 0
    assert st["step"].item() == 1


def test_exponent_zero_keeps_one_state_tensor_unless_tracked():
    ps = _model()
    opt = smes_fused.SMES(ps, exponent=0.0, amsgrad=True)
    _grads(ps, 1)
    opt.step()
    assert set(opt.state[ps[0]]) == {"step", "exp_avg"}
    opt.param_groups[0]["exponent"] = 0.3
    with pytest.raises(ValueError, match="track_second_moment=True"):
        opt.step()

    qs = _model()
    opt = smes_fused.SMES(qs, exponent=0.0, track_second_moment=True)
    _grads(qs, 1)
    opt.step()
    v0 = opt.state[qs[0]]["exp_avg_sq"].clone()
    assert v0.abs().sum() > 0, "a tracked v is updated at p = 0"
    opt.param_groups[0]["exponent"] = -0.08  # an exponent schedule
    opt.step()
    assert opt.state[qs[0]]["step"].item() == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_state_dtype(dtype):
    p = torch.randn(8, dtype=dtype, requires_grad=True)
    q = torch.randn(8, dtype=dtype, requires_grad=True)
    opt = smes_fused.SMES([{"params": [p]}, {"params": [q], "state_dtype": "param"}])
    p.grad = torch.randn(8, dtype=dtype)
    q.grad = torch.randn(8, dtype=dtype)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    assert opt.state[q]["exp_avg"].dtype == dtype


def test_load_state_dict_never_downcasts():
    p = torch.randn(8, dtype=torch.bfloat16, requires_grad=True)
    opt = smes_fused.SMES([p])
    p.grad = torch.randn(8, dtype=torch.bfloat16)
    opt.step()
    sd = opt.state_dict()
    opt2 = smes_fused.SMES([p])
    opt2.load_state_dict(sd)
    assert opt2.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    sd_param = copy.deepcopy(sd)  # a checkpoint whose group asks for bf16 state
    sd_param["param_groups"][0]["state_dtype"] = "param"
    opt3 = smes_fused.SMES([p])
    with pytest.warns(UserWarning, match="rather than downcasting"):
        opt3.load_state_dict(sd_param)
    assert opt3.state[p]["exp_avg"].dtype == torch.float32
    # A bf16 AdamW checkpoint loaded into SMES is upcast to SMES's float32 state.
    adamw = torch.optim.AdamW([p])
    adamw.step()
    opt4 = smes_fused.SMES([p])
    opt4.load_state_dict(adamw.state_dict())
    assert opt4.state[p]["exp_avg"].dtype == torch.float32


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exponent", [0.5, -0.08, 0.0])
def test_round_trip_resumes_bit_identically(backend, exponent):
    ps = _model()
    opt = smes_fused.SMES(ps, exponent=exponent, amsgrad=True, backend=backend)
    for s in range(3):
        _grads(ps, s)
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    qs = [t.clone().requires_grad_() for t in ckpt["params"]]
    opt2 = smes_fused.SMES(qs, exponent=0.3, backend=backend)  # group values come from ckpt
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["exponent"] == exponent
    for s in range(3, 6):
        _grads(ps, s)
        _grads(qs, s)
        opt.step()
        opt2.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], opt2.state[q][k])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["adamw", "adam_l2"])
def test_adamw_checkpoint_continues_in_smes(backend, source):
    ps = _model()
    if source == "adamw":
        src = torch.optim.AdamW(ps, lr=2e-3, weight_decay=0.05)
    else:
        src = torch.optim.Adam(ps, lr=2e-3, weight_decay=0.05)
    for s in range(4):
        _grads(ps, s)
        src.step()
    qs = [p.detach().clone().requires_grad_() for p in ps]
    smes = smes_fused.SMES(qs, exponent=0.5, backend=backend)
    smes.load_state_dict(copy.deepcopy(src.state_dict()))  # a checkpoint, not live tensors
    assert smes.param_groups[0]["lr"] == 2e-3
    assert smes.param_groups[0]["decoupled_weight_decay"] == (source == "adamw")
    for s in range(4, 12):
        _grads(ps, s)
        _grads(qs, s)
        src.step()
        smes.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smes_checkpoint_continues_in_adamw(backend):
    ps = _model()
    smes = smes_fused.SMES(ps, exponent=0.5, lr=2e-3, backend=backend)
    for s in range(4):
        _grads(ps, s)
        smes.step()
    qs = [p.detach().clone().requires_grad_() for p in ps]
    adamw = torch.optim.AdamW(qs)
    adamw.load_state_dict(copy.deepcopy(smes.state_dict()))
    for s in range(4, 12):
        _grads(ps, s)
        _grads(qs, s)
        smes.step()
        adamw.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q)


# ------------------------------------------------------------------ bad input (SPEC §5)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(lr=-1e-3), ValueError, "learning rate: -0.001"),
        (dict(eps=-1.0), ValueError, "epsilon value: -1.0"),
        (dict(betas=(1.0, 0.999)), ValueError, "beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), ValueError, "beta parameter at index 1: -0.1"),
        (dict(betas=0.9), TypeError, "betas"),
        (dict(exponent=math.nan), ValueError, "exponent: nan"),
        (dict(exponent=math.inf), ValueError, "exponent: inf"),
        (dict(exponent="0.5"), TypeError, "exponent"),
        (dict(exponent=0.3, eps=0.0), ValueError, "exponent > 0 needs eps > 0"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay value: -0.1"),
        (dict(backend="fastest"), ValueError, "backend: 'fastest'"),
        (dict(state_dtype=torch.int32), ValueError, "state_dtype"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        smes_fused.SMES(_model(), **kwargs)


def test_negative_exponent_with_zero_eps_is_allowed():
    smes_fused.SMES(_model(), exponent=-0.08, eps=0.0)


def test_complex_params_are_rejected():
    with pytest.raises(TypeError, match="complex"):
        smes_fused.SMES([torch.randn(3, dtype=torch.complex64, requires_grad=True)])


def _trained():
    ps = _model()
    extra = torch.randn(5, requires_grad=True)
    opt = smes_fused.SMES([{"params": ps}, {"params": [extra], "lr": 1e-2}])
    _grads(ps + [extra], 0)
    opt.step()
    _grads(ps + [extra], 1)
    return ps + [extra], opt


@pytest.mark.parametrize(
    "spoil, exc, words",
    [
        (lambda ps, o: o.param_groups[1].update(lr=-1.0), ValueError, "learning rate"),
        (lambda ps, o: o.param_groups[1].update(exponent=math.nan), ValueError, "exponent"),
        (lambda ps, o: o.param_groups[1].update(betas=(0.9, 1.5)), ValueError, "index 1"),
        (lambda ps, o: o.param_groups[1].update(eps=0.0), ValueError, "eps"),
        (
            lambda ps, o: setattr(ps[2], "grad", torch.randn(5).to_sparse()),
            RuntimeError,
            "sparse",
        ),
        (lambda ps, o: setattr(o, "backend", "cuda"), RuntimeError, "backend 'cuda'"),
    ],
)
def test_rejected_step_mutates_nothing(spoil, exc, words):
    ps, opt = _trained()
    snap = _snapshot(ps, opt)
    spoil(ps, opt)
    groups_before = copy.deepcopy(opt.state_dict()["param_groups"])
    with pytest.raises(exc, match=words):
        opt.step()
    snap[1]["param_groups"] = groups_before
    _assert_unchanged(ps, opt, snap)


def test_rejected_first_step_creates_no_state():
    ps = _model()
    bad = torch.randn(5, requires_grad=True)
    opt = smes_fused.SMES([{"params": ps}, {"params": [bad]}])
    _grads(ps, 0)
    bad.grad = torch.randn(5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert len(opt.state) == 0


def test_unavailable_backend_says_how_to_get_it():
    """An explicit backend that cannot run here is reported at construction (SPEC §5)."""
    reasons = smes_fused.available_backends()
    assert reasons["reference"] is None and reasons["foreach"] is None
    for name, why in reasons.items():
        if why is not None:
            with pytest.raises(RuntimeError, match=f"backend '{name}' is not available: .+"):
                smes_fused.SMES(_model(), backend=name)


@pytest.mark.parametrize(
    "grad, exc, words",
    [
        (torch.randn(4, 9), ValueError, "shape"),
        (torch.randn(9, 4, dtype=torch.float64), TypeError, "dtype"),
        (torch.randn(9, 4, device="meta"), RuntimeError, "device"),
    ],
)
def test_functional_rejects_mismatched_grads_before_mutating(grad, exc, words):
    good = torch.randn(3)
    p = torch.randn(9, 4)
    params = [good, p]
    snap = [t.clone() for t in params]
    m = [torch.zeros(3), torch.zeros(9, 4)]
    v = [torch.zeros(3), torch.zeros(9, 4)]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    with pytest.raises(exc, match=words):
        functional.smes(params, [torch.randn(3), grad], m, v, [None, None], steps)
    assert all(torch.equal(a, b) for a, b in zip(params, snap))
    assert all(s.item() == 0 for s in steps) and all(t.abs().sum() == 0 for t in m + v)


@pytest.mark.parametrize("backend", host_backends())
@pytest.mark.parametrize(
    "bad",
    [torch.zeros(4, 9), torch.zeros(9, 4, dtype=torch.int64)],
    ids=["shape", "integer"],
)
def test_functional_rejects_bad_state_before_mutating(backend, bad):
    """State that does not fit its param (another shape, an integer dtype) is refused with
    nothing written on every backend (reference and foreach updated the first tensor and both
    step counts, then raised a broadcast error; an integer state was truncated to 0)."""
    params = [torch.randn(3), torch.randn(9, 4)]
    snap = [t.clone() for t in params]
    m = [torch.zeros(3), bad]
    v = [torch.zeros(3), torch.zeros(9, 4)]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    with pytest.raises((ValueError, RuntimeError), match="shape|dtype"):
        functional.smes(params, [torch.randn(3), torch.randn(9, 4)], m, v, [], steps,
                        backend=backend)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(params, snap))
    assert all(s.item() == 0 for s in steps) and all(t.abs().sum() == 0 for t in m + v)


@pytest.mark.parametrize(
    "where, words",
    [
        ("params", r"params\[0\] and params\[1\]"),
        ("exp_avgs", r"exp_avgs\[0\] and exp_avgs\[1\]"),
        ("state_steps", r"state_steps\[0\] and state_steps\[1\]"),
        ("v is m", r"exp_avgs\[0\] and exp_avg_sqs\[0\]"),
    ],
)
def test_functional_rejects_a_tensor_given_twice_before_mutating(where, words):
    """The same tensor twice (in a list or in two roles) would be updated twice per step, a data
    race in the fused kernels: refused with nothing written (it was taken)."""
    a, b = torch.randn(5), torch.randn(5)
    m, v = [torch.zeros(5), torch.zeros(5)], [torch.zeros(5), torch.zeros(5)]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    params = [a, b]
    if where == "params":
        params = [a, a]
    elif where == "exp_avgs":
        m = [m[0], m[0]]
    elif where == "state_steps":
        steps = [steps[0], steps[0]]
    else:
        v = [m[0], v[1]]
    snap = [t.clone() for t in (a, b, *m, *v, *steps)]
    with pytest.raises(ValueError, match=words + " are the same tensor"):
        functional.smes(params, [torch.ones(5), torch.ones(5)], m, v, [], steps)
    assert all(torch.equal(x, y) for x, y in zip((a, b, *m, *v, *steps), snap, strict=True))


def test_functional_ignores_max_exp_avg_sqs_without_amsgrad():
    """Without amsgrad the list is not used, so placeholders there (the exp_avgs, one tensor
    repeated) are not a tensor given twice."""
    params, m = [torch.ones(3), torch.ones(3)], [torch.zeros(3), torch.zeros(3)]
    v, steps = [torch.zeros(3), torch.zeros(3)], [torch.tensor(0.0), torch.tensor(0.0)]
    for placeholders in (m, [v[0], v[0]]):
        functional.smes(params, [torch.ones(3)] * 2, m, v, placeholders, steps)
    assert all(s.item() == 2 for s in steps)


def test_functional_takes_an_empty_max_exp_avg_sqs_as_adamw_does():
    params = [torch.ones(3)]
    functional.smes(params, [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)], [],
                    [torch.tensor(0.0)], exponent=0.5)  # fmt: skip
    assert not torch.equal(params[0], torch.ones(3))
    with pytest.raises(ValueError, match="same length"):
        functional.smes(params, [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)], [],
                        [torch.tensor(0.0)], amsgrad=True)  # fmt: skip


def test_load_state_dict_with_wrong_shapes_is_rejected_whole():
    ps, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg"] = torch.zeros(3)
    snap = _snapshot(ps, opt)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)
    _assert_unchanged(ps, opt, snap)


# ------------------------------------------------------------------ the cached plan


def test_bucket_index_lists_follow_append():
    from smes_fused._bucket import Bucket, BucketKey

    def hyper(p, track_v=True):
        return functional.make_hyper(
            lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, exponent=p,
            decoupled_weight_decay=True, amsgrad=False, maximize=False, bias_correction=True,
            track_second_moment=track_v,
        )  # fmt: skip

    t = torch.zeros(2)
    b = Bucket(BucketKey(t.device, t.dtype, t.dtype))
    b.append(t, t, t, t, None, t, hyper(0.5))
    assert b.by_state_kind() == {(True, False): [0]}
    assert b.by_variant() == {hyper(0.5).variant: [0]}
    b.append(t, t, t, None, None, t, hyper(0.0, track_v=False))
    assert b.by_state_kind() == {(True, False): [0], (False, False): [1]}
    assert list(b.by_variant().values()) == [[0], [1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_buckets_follow_every_change(backend):
    """SMES.step keeps its buckets between steps: each change below must still take effect,
    matched step for step by an optimizer that is rebuilt from scratch every time."""
    ps = _model()
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = smes_fused.SMES(ps, exponent=0.5, backend=backend)

    def fresh_step(qs, state_dict, seed, **group):
        o = smes_fused.SMES(qs, exponent=0.5, backend="reference")
        if state_dict is not None:
            o.load_state_dict(copy.deepcopy(state_dict))
        o.param_groups[0].update(group)
        _grads(qs, seed)
        o.step()
        return o.state_dict()

    sd = None
    for s in range(2):
        _grads(ps, s)
        opt.step()
        sd = fresh_step(qs, sd, s)
    ckpt = copy.deepcopy(opt.state_dict())
    params_ckpt = [p.detach().clone() for p in ps]

    opt.param_groups[0]["exponent"] = -0.08  # a new exponent class
    _grads(ps, 2)
    opt.step()
    sd = fresh_step(qs, sd, 2, exponent=-0.08)

    opt.param_groups[0]["lr"] = 5e-3  # a new value (as a scheduler sets it)
    _grads(ps, 3)
    opt.step()
    sd = fresh_step(qs, sd, 3, exponent=-0.08, lr=5e-3)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

    # load_state_dict into the live optimizer: the next step uses the loaded state
    opt.load_state_dict(copy.deepcopy(ckpt))
    with torch.no_grad():
        for p, q, c in zip(ps, qs, params_ckpt):
            p.copy_(c)
            q.copy_(c)
    _grads(ps, 4)
    opt.step()
    sd = fresh_step(qs, ckpt, 4)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt.state[ps[0]]["step"].item() == 3

    # a state reset by hand starts from scratch
    opt.state.clear()
    _grads(ps, 5)
    opt.step()
    assert opt.state[ps[0]]["step"].item() == 1

    # a new param group joins the buckets
    extra = torch.randn(6, requires_grad=True)
    opt.add_param_group({"params": [extra], "exponent": 0.25})
    _grads(ps + [extra], 6)
    opt.step()
    assert opt.state[extra]["step"].item() == 1
    assert opt.state[ps[0]]["step"].item() == 2


def test_option_defaults_agree_everywhere():
    """The SPEC §4 options default alike in SMES, functional.smes and the validation that fills
    in groups and old checkpoints (functional.OPTION_DEFAULTS, from check_hyper)."""
    import inspect

    from smes_fused import SMES

    for fn in (SMES.__init__, functional.smes):
        params = inspect.signature(fn).parameters
        for name, default in functional.OPTION_DEFAULTS.items():
            if name == "track_second_moment":
                continue  # SMES: None (exponent != 0); smes(): from the exp_avg_sqs given
            assert params[name].default == default, (fn.__qualname__, name)
    assert set(functional.HYPER_KEYS) <= set(inspect.signature(SMES.__init__).parameters)


@pytest.mark.parametrize("backend", host_backends())
@pytest.mark.parametrize("exponent", [-0.08, 0.37])
def test_step_does_not_depend_on_where_a_tensor_is_split(backend, exponent):
    """A tensor stepped whole and as pieces of 15 elements (shards: every piece a loop tail)
    steps bit-identically, on every host backend. The reference and foreach backends' float32
    ``v ** p`` did not on CPU: torch's pow rounds a vector's lanes (Sleef) and a tail's elements
    (scalar) differently, so an element's result depended on where its piece began (on AVX-512
    tests/test_stacks.py's FSDP2 cases of the reference backend failed)."""
    torch.manual_seed(0)
    n, k = 6000, 15
    theta = torch.randn(n)
    grads = [torch.randn(n) * 10.0 ** torch.randint(-6, 2, (n,)).float() for _ in range(2)]
    whole = theta.clone().requires_grad_()
    parts = [t.clone().requires_grad_() for t in theta.split(k)]
    o1 = smes_fused.SMES([whole], lr=1e-2, exponent=exponent, backend=backend)
    o2 = smes_fused.SMES(parts, lr=1e-2, exponent=exponent, backend=backend)
    for g in grads:
        whole.grad = g.clone()
        for q, gq in zip(parts, g.split(k)):
            q.grad = gq.clone()
        o1.step()
        o2.step()
    assert torch.equal(whole.detach(), torch.cat([q.detach() for q in parts]))
