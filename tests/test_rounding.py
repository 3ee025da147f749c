"""Stochastic rounding of bf16 params (``stochastic_rounding=True``, smes_fused/_rounding.py) on
every CPU backend and the Triton interpreter: unbiased (the mean of many rounded values within a
statistical bound of the float32 value), reproducible from the seed and the step, the same bits in
every backend, and nothing changed for other dtypes."""

from __future__ import annotations

import pytest
import torch
from _backends import require, use_triton_interpreter

from smes_fused import SMES
from smes_fused._rounding import M32, mix, round_to_bf16, tensor_key, tensor_salt

use_triton_interpreter()
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")


@pytest.fixture(params=["reference", "foreach", "cpu", "triton"])
def backend(request) -> str:
    return require(request.param)


def test_definition_is_unbiased_and_keeps_specials():
    x = torch.full((400_000,), 1.0 + 2**-10)  # 1/8 of the way from bf16 1.0 to 1.0078125
    y = round_to_bf16(x, tensor_key(0, 1)).double()
    assert set(y.unique().tolist()) == {1.0, 1.0078125}
    sigma = (0.125 * 0.875) ** 0.5 * 2**-7 / len(x) ** 0.5
    assert abs(float(y.mean()) - (1.0 + 2**-10)) < 5 * sigma
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    out = round_to_bf16(specials, 7).float()
    assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf")
    assert out[3] == 0 and out[4] == 0


def test_tensor_salt():
    """Each tensor's seed is its group's XOR a salt of its position and, for a shard, its offset
    (tests/test_stacks.py steps sharded params): a salt of its own for every position and offset,
    64-bit offsets included, none 0 (a tensor never rounds with its group's seed itself)."""
    cases = [(i, o) for i in (0, 1, 2, 1000) for o in (0, 1, 1024, 2**32, 3 * 2**40 + 7)]
    salts = [tensor_salt(i, o) for i, o in cases]
    assert len(set(salts)) == len(salts) and all(0 < s < 2**32 for s in salts)


def test_reference_follows_the_definition():
    """The reference backend's rounding, written out from the definition: each tensor's key
    from its group's seed XOR its salt and the step; the elements counted in memory order (a
    channels_last weight: the order of its NHWC memory)."""
    torch.manual_seed(0)
    ps = [torch.randn(1000).bfloat16(), torch.randn(8, 3, 5, 5).bfloat16()]
    ps[1] = ps[1].to(memory_format=torch.channels_last)
    ps = [p.requires_grad_() for p in ps]
    olds = [p.detach().float() for p in ps]
    opt = SMES(ps, lr=1e-2, weight_decay=0.3, stochastic_rounding=True, rounding_seed=9,
               backend="reference")  # fmt: skip
    for p in ps:
        p.grad = torch.zeros_like(p)  # θ ← θ (1 − lr λ) in float32
    opt.step()
    decay = torch.tensor(1 - 1e-2 * 0.3, dtype=torch.float32)
    for i, (p, old) in enumerate(zip(ps, olds)):
        x = old * decay
        flat = x.permute(0, 2, 3, 1).reshape(-1) if x.dim() == 4 else x  # memory order
        idx = torch.arange(flat.numel(), dtype=torch.int64)
        key = mix((9 ^ mix(mix(mix(i + 1)))) ^ mix(1 * 0x9E3779B9))
        r = mix(key ^ (idx & M32) ^ mix(idx >> 32)) & 0xFFFF
        bits = ((flat.view(torch.int32).to(torch.int64) & M32) + r) >> 16
        want = (bits & 0xFFFF).to(torch.int32).to(torch.int16)
        got = p.detach().permute(0, 2, 3, 1).reshape(-1) if p.dim() == 4 else p.detach()
        assert torch.equal(got.view(torch.int16), want), f"tensor {i}"


def _decay_step(backend, n=200_000, seed=0, sr=True, dtype=torch.bfloat16):
    """One step whose float32 result is known: zero gradient and state, so θ ← θ(1 − lr·λ):
    1.0 → 0.999, between the bf16 values 0.99609375 and 1.0."""
    p = torch.ones(n, dtype=dtype, requires_grad=True)
    opt = SMES([p], lr=1e-3, weight_decay=1.0, stochastic_rounding=sr, rounding_seed=seed,
               backend=backend)  # fmt: skip
    p.grad = torch.zeros_like(p)
    opt.step()
    return p.detach().clone()


def test_unbiased_in_every_backend(backend):
    y = _decay_step(backend).double()
    target = float(torch.tensor(1.0 - 1e-3, dtype=torch.float32))
    lo, hi = 0.99609375, 1.0
    q = (target - lo) / (hi - lo)
    sigma = (q * (1 - q)) ** 0.5 * (hi - lo) / len(y) ** 0.5
    assert set(y.unique().tolist()) == {lo, hi}
    assert abs(float(y.mean()) - target) < 5 * sigma
    # round to nearest: every value 1.0, a bias of 1e-3 (185 sigma)
    assert torch.all(_decay_step(backend, sr=False) == 1.0)


def test_reproducible_from_seed_and_step(backend):
    a, b = _decay_step(backend, seed=3), _decay_step(backend, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, _decay_step(backend, seed=4))


def test_same_bits_as_the_definition_in_every_backend(backend, monkeypatch):
    """Two steps at p = 0.5 and p = 0 (every backend computes the same float32 θ there): the
    rounded θ is bit for bit the reference's, which applies smes_fused._rounding directly. The
    two groups differ in variant and in state kind (p = 0 keeps no v), which the fused backends
    launch apart, and two params are not row-major (channels_last, a transposed leaf), which
    the kernels walk in memory order: once the kernels keyed the noise on a tensor's place in
    its launch and the reference on its place in the bucket, and the reference counted the
    elements row-major. The grads have their params' layouts, so no tensor of a fused backend
    falls back to the reference path (checked)."""
    from smes_fused.backends import get

    ref_calls = []
    ref_type = type(get("reference"))
    ref_call = ref_type.__call__
    monkeypatch.setattr(
        ref_type, "__call__", lambda *a, **k: (ref_calls.append(1), ref_call(*a, **k))
    )

    def run(name):
        torch.manual_seed(0)
        ps = [
            torch.randn(64, 33).bfloat16(),
            torch.randn(1000).bfloat16(),
            torch.randn(8, 3, 5, 5).bfloat16().to(memory_format=torch.channels_last),
            torch.randn(40, 30).bfloat16().t(),
        ]
        ps = [p.detach().requires_grad_() for p in ps]
        groups = [{"params": ps[:1]}, {"params": ps[1:3], "exponent": 0.0}, {"params": ps[3:]}]
        opt = SMES(groups, lr=1e-2, stochastic_rounding=True, rounding_seed=11, backend=name)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            for p in ps:
                p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))
            opt.step()
        return [p.detach() for p in ps]

    ours = run(backend)
    assert backend == "reference" or not ref_calls, "a fused backend fell back to the reference"
    for a, b in zip(ours, run("reference")):
        assert torch.equal(a, b)


def _cpu_isa(monkeypatch, isa: str) -> None:
    """Run the CPU backend on kernel set ``isa``; skip where this CPU does not have it."""
    require("cpu")
    from smes_fused import _ops

    monkeypatch.setenv("SMES_CPU_ISA", isa)
    if _ops.cpu_isa() != isa:
        pytest.skip(f"this CPU has no {isa}")


@pytest.mark.parametrize("isa", ["avx512", "avx2", "base"])
@pytest.mark.parametrize("exponent", [0.5, -0.08])
@pytest.mark.parametrize(
    "state_dtype, projection",
    # (projected with bf16 state, the second pass reads the moments as stored: rounded to bf16)
    [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
)
def test_cpu_rounds_its_own_float32_result(monkeypatch, isa, exponent, state_dtype, projection):
    """Every CPU kernel set and loop (p = 0.5 and general p take different loops on AVX2, bf16
    state the even/odd-pair ones, projected tensors two passes; sizes with a partial last
    vector, and one that two threads split mid-vector): the bf16 θ of a stochastically rounded
    first step is exactly ``round_to_bf16`` of the float32 θ that the same kernel computes for
    float32 params and state holding the same values (the kernel works in float32 either way,
    and the state starts at 0), with each tensor's own key; inf, NaN and the largest bf16 among
    them. (The AVX2 general-p loop once rounded the last elements of a segment, past its
    blocks, to nearest.)"""
    _cpu_isa(monkeypatch, isa)
    torch.manual_seed(0)
    sizes = [(64, 33), (1003,), (5,), (4099,), (70001,)]
    th = [torch.randn(s).bfloat16() for s in sizes]
    gs = [torch.randn(s).bfloat16() for s in sizes]
    th[1][:4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.3895e38])

    def step(dtype, sdt, sr):
        ps = [t.to(dtype, copy=True).requires_grad_() for t in th]
        opt = SMES(ps, lr=1e-2, exponent=exponent, stochastic_rounding=sr, rounding_seed=5,
                   state_dtype=sdt, projection=projection, backend="cpu")  # fmt: skip
        for p, g in zip(ps, gs):
            p.grad = g.to(dtype)
        opt.step()
        return [p.detach() for p in ps]

    exact = step(torch.float32, torch.float32, False)
    for i, (a, x) in enumerate(zip(step(torch.bfloat16, state_dtype, True), exact)):
        ref = round_to_bf16(x, tensor_key(5 ^ tensor_salt(i), 1))
        torch.testing.assert_close(a, ref, rtol=0, atol=0, equal_nan=True, msg=f"{isa} {i}")
    monkeypatch.delenv("SMES_CPU_ISA")


@pytest.mark.parametrize("isa", ["avx512", "avx2", "base"])
def test_cpu_noise_of_lanes_past_a_multiple_of_2_32(monkeypatch, isa):
    """The CPU kernels hash the high word of the element index once per vector, and the lanes of
    a vector (or of an even/odd pair) that straddles a multiple of 2^32 take the next one:
    checked lane by lane against the definition at indices no tensor of a test reaches."""
    _cpu_isa(monkeypatch, isa)
    from smes_fused._ops import _C

    key = tensor_key(3, 7)
    for index in (0, 12345, 2**32 - 1, 2**32 - 5, 2**32 - 9, 2**32 - 31, 2**32, 3 * 2**32 - 2,
                  2**40 + 2**32 - 3):  # fmt: skip
        lanes = _C.sr_noise_lanes(key, index)
        w = len(lanes) // 3
        offsets = [*range(w), *range(0, 2 * w, 2), *range(1, 2 * w, 2)]
        idx = torch.tensor([index + o for o in offsets], dtype=torch.int64)
        assert lanes == (mix(key ^ (idx & M32) ^ mix(idx >> 32)) & 0xFFFF).tolist(), (isa, index)
    monkeypatch.delenv("SMES_CPU_ISA")


def test_other_dtypes_are_rounded_as_before(backend):
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(
            _decay_step(backend, n=1000, dtype=dtype),
            _decay_step(backend, n=1000, sr=False, dtype=dtype),
        )


def test_numpy_rounding_seed_is_taken_as_a_python_int():
    """A numpy integer seed, as torch takes numpy numbers: the same bits as the Python int, and
    the group holds the Python int (a checkpoint with a numpy value does not load with
    torch.load(weights_only=True)); it was refused."""
    import numpy as np

    assert torch.equal(
        _decay_step("reference", n=10, seed=np.int64(5)), _decay_step("reference", n=10, seed=5)
    )
    opt = SMES([torch.zeros(2, requires_grad=True)], rounding_seed=np.uint32(7))
    assert type(opt.param_groups[0]["rounding_seed"]) is int


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, True])
def test_bad_rounding_seed(bad):
    with pytest.raises(ValueError, match="rounding_seed"):
        SMES([torch.zeros(2, requires_grad=True)], stochastic_rounding=True, rounding_seed=bad)
