"""Backend "triton", host side: the table cache, launches per step, layouts, lr tensors, CUDA-graph
capture (mocked), the device guard, old Tritons and torch.compile, under Triton's interpreter.

Like test_triton.py, this sets ``TRITON_INTERPRET=1`` before it imports the kernels. Tensors are
small: the interpreter runs one Python iteration per program.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
from smes_fused.triton_kernels import smes as K  # noqa: E402

if not K.INTERPRET:
    K = importlib.reload(K)

from smes_fused.triton_kernels import smes_checks, smes_tables  # noqa: E402

from smes_fused._bucket import Bucket, BucketKey, Hyper  # noqa: E402
from smes_fused.backends import get, resolve  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
CPU = torch.device("cpu")


def _hyper(exponent=-0.08, lr=1e-3, **kw):
    return Hyper(
        lr=lr,
        beta1=kw.get("beta1", 0.9),
        beta2=0.999,
        eps=1e-8,
        exponent=exponent,
        weight_decay=kw.get("weight_decay", 1e-2),
        decoupled=True,
        amsgrad=False,
        maximize=False,
        bias_correction=True,
        track_v=exponent != 0,
    )


def _pair(shapes, hypers, *, seed=0):
    """Two equal buckets (for "triton" and "reference") over the given shapes."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        b = Bucket(BucketKey(CPU, torch.float32, torch.float32))
        out.append(b)
    for shape, h in zip(shapes, hypers):
        p = torch.randn(shape, generator=gen)
        g = torch.randn(shape, generator=gen)
        m = 0.1 * torch.randn(shape, generator=gen)
        v = 1e-2 * torch.rand(shape, generator=gen)
        for b in out:
            b.append(p.clone(), g.clone(), m.clone(), v.clone() if h.track_v else None, None,
                     torch.tensor(2.0), h)  # fmt: skip
    return out


def _close(a: Bucket, b: Bucket):
    for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


class _AtenLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops a step runs (views aside): each is a device kernel on a GPU."""

    VIEWS = {"slice", "view", "select", "alias", "as_strided", "detach", "unsqueeze"}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.paused = 0  # inside a launch: the interpreter's own host copies do not count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS and not self.paused:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))

    def kernel(self, kernel):
        log = self

        class Paused:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    log.paused += 1
                    try:
                        return launch(*args, **kwargs)
                    finally:
                        log.paused -= 1

                return run

        return Paused()


# ------------------------------------------------------------------------ launches per step


@pytest.mark.parametrize("lr_dtype", [None, torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_found_inf", [False, True])
def test_two_launches_and_no_other_kernel_per_step(lr_dtype, with_found_inf, monkeypatch):
    """A steady-state step is the prologue and the element kernel: no step-count _foreach_add_,
    no found_inf _foreach_sub_, no cast of a tensor lr of another dtype (issue 14, item 12)."""
    lr = 1e-2 if lr_dtype is None else torch.tensor(1e-2, dtype=lr_dtype)
    h = _hyper(lr=lr)
    a, r = _pair([(5,), (3, 7)], [h, h])
    kw = {}
    if with_found_inf:
        kw = dict(found_inf=torch.zeros(1), grad_scale=torch.ones(1))
    get("triton")(a, **kw)  # first step: builds and uploads
    get("reference")(r, **kw)
    launches = K.CACHE.stats["launches"]
    log = _AtenLog()
    monkeypatch.setattr(K, "_smes_step_kernel", log.kernel(K._smes_step_kernel))
    monkeypatch.setattr(K, "_smes_scalars_kernel", log.kernel(K._smes_scalars_kernel))
    with log:
        get("triton")(a, **kw)
    assert K.CACHE.stats["launches"] == launches + K.LAUNCHES_PER_STEP == launches + 2
    assert log.ops == [], log.ops
    get("reference")(r, **kw)
    _close(a, r)
    assert float(a.steps[0]) == 4.0


def test_found_inf_leaves_step_counts():
    h = _hyper()
    a, _ = _pair([(5,), (0,), (9,)], [h, h, h])
    before = [s.clone() for s in a.steps]
    get("triton")(a, found_inf=torch.ones(1))
    assert all(torch.equal(x, y) for x, y in zip(before, a.steps))
    get("triton")(a, found_inf=torch.zeros(1))
    assert [float(s) for s in a.steps] == [3.0, 3.0, 3.0]  # the zero-size one advances too


# ------------------------------------------------------------------------ uploads (item 7)


def test_lr_schedule_uploads_one_group_row_and_rechecks_nothing(monkeypatch):
    ha, hb = _hyper(lr=1e-3), _hyper(lr=2e-3, beta1=0.8)
    shapes = [(4,)] * 6
    a, r = _pair(shapes, [ha, ha, ha, hb, hb, hb])
    get("triton")(a)
    get("reference")(r)
    checked = []
    real = smes_checks.check_static
    monkeypatch.setattr(smes_checks, "check_static", lambda *x: checked.append(x) or real(*x))
    monkeypatch.setattr(smes_checks, "check_grads", lambda p, g, rows: checked.append(rows))
    rows, uploads = K.CACHE.stats["rows"], K.CACHE.stats["uploads"]
    hb2 = _hyper(lr=1e-4, beta1=0.8)  # a scheduler step on the second group
    a.hypers = [ha] * 3 + [hb2] * 3
    r.hypers = list(a.hypers)
    get("triton")(a)
    get("reference")(r)
    assert K.CACHE.stats["uploads"] == uploads + 1
    assert K.CACHE.stats["rows"] == rows + 1  # one group row, not the 6 tensor rows
    assert checked == []
    # One new grad: one tensor row uploaded, only that grad checked.
    a.grads = list(a.grads)
    a.grads[4] = a.grads[4].clone()
    r.grads = list(r.grads)
    get("triton")(a)
    get("reference")(r)
    assert K.CACHE.stats["rows"] == rows + 2
    assert checked == [[4]]
    _close(a, r)


# ------------------------------------------------------------------------ layouts (item 10)


def test_size_one_dims_strides_do_not_count():
    """A (1, 8) param whose grad has strides (1, 1): autograd's layout contract allows it."""
    h = _hyper()
    a, r = _pair([(1, 8), (8, 1)], [h, h])
    for b in (a, r):
        b.grads[0] = b.grads[0].reshape(8).as_strided((1, 8), (1, 1))
        b.grads[1] = b.grads[1].reshape(8).as_strided((8, 1), (1, 1))
    assert a.grads[0].stride() != a.params[0].stride()
    get("triton")(a)
    get("reference")(r)
    _close(a, r)


def test_layout_checks():
    x = torch.zeros(2, 3, 4)
    assert smes_checks.dense(x) and smes_checks.dense(x.permute(2, 0, 1))
    assert not smes_checks.dense(x[:, :, :2])
    assert smes_checks.same_layout(x, x.clone())
    assert not smes_checks.same_layout(x.permute(2, 0, 1).contiguous(), x.permute(2, 0, 1))
    h = _hyper()
    a, r = _pair([(4, 4), (3,)], [h, h])
    a.grads[0] = r.grads[0] = a.grads[0].t()  # dense, but not the param's layout
    with pytest.raises(smes_checks.LayoutError, match="strides"):  # raised before any write
        K.smes_step(a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, a.max_exp_avg_sqs, a.steps,
                    a.hypers, h.variant)  # fmt: skip
    assert all(s.item() == 2.0 for s in a.steps)
    # The backend applies what the kernel cannot walk per tensor, the rest in the kernel.
    get("triton")(a)
    get("reference")(r)
    _close(a, r)
    assert all(s.item() == 3.0 for s in a.steps)


# ------------------------------------------------------------------------ block map (item 8)


def test_block_map_built_on_device_matches_the_list():
    numels = [0, 1, 4096, 4097, 0, 9000, 3]
    bm, n_blocks = smes_tables.block_map_on_device(numels, 4096, CPU)
    want = [(i, b) for i, ne in enumerate(numels) for b in range(-(-ne // 4096))]
    assert n_blocks == len(want) and bm.dtype == torch.int32
    assert bm.tolist() == [list(w) for w in want]


# ------------------------------------------------------------------------ CUDA graphs (item 3)


def test_capture_freezes_tables_and_never_rewrites_them(monkeypatch):
    """Capture (mocked: the same code path, kernels run at once) of a step whose grads are new
    (set_to_none, then backward inside the capture): a new frozen table; eager steps after it
    build their own, and LRU eviction never drops a table a graph reads."""
    cache = smes_tables.TableCache(capacity=1)
    monkeypatch.setattr(K, "CACHE", cache)
    h = _hyper()
    a, r = _pair([(5,), (7,)], [h, h])
    get("triton")(a)  # warm-up step (eager)
    get("reference")(r)
    eager = next(iter(cache.entries.values()))
    eager_rows = eager.buf.clone()

    monkeypatch.setattr(K, "capturing", lambda device: True)
    a.grads = [g.clone() for g in a.grads]  # grads allocated inside the capture
    r.grads = [g.clone() for g in r.grads]
    get("triton")(a)
    get("reference")(r)
    assert cache.stats["graph_tables"] == 1
    graph = cache.graph_tables[0]
    assert graph is not eager and graph.frozen
    assert torch.equal(eager.buf, eager_rows)  # the eager table was not touched
    graph_rows = graph.buf.clone()
    # Captured again with the same grads: the same frozen table is current; no new one.
    get("triton")(a)
    get("reference")(r)
    monkeypatch.setattr(K, "capturing", lambda device: False)

    # Eager steps afterwards, with other grads and other parameters filling the tiny LRU.
    a.grads = [g.clone() for g in a.grads]
    r.grads = [g.clone() for g in r.grads]
    get("triton")(a)
    get("reference")(r)
    other, _ = _pair([(3,)], [h])
    get("triton")(other)
    assert torch.equal(graph.buf, graph_rows)
    assert graph in cache.graph_tables and len(cache.entries) == 1
    _close(a, r)


def test_capture_of_a_current_table_freezes_it(monkeypatch):
    cache = smes_tables.TableCache()
    monkeypatch.setattr(K, "CACHE", cache)
    h = _hyper()
    a, _ = _pair([(5,)], [h])
    get("triton")(a)
    eager = next(iter(cache.entries.values()))
    monkeypatch.setattr(K, "capturing", lambda device: True)
    get("triton")(a)  # same grads: the eager table is current, the graph will read it
    assert eager.frozen and cache.graph_tables == [eager] and not cache.entries
    get("triton")(a)  # a second capture, no eager step between: the frozen table serves it
    assert cache.graph_tables == [eager] and cache.stats["builds"] == 1
    monkeypatch.setattr(K, "capturing", lambda device: False)
    builds = cache.stats["builds"]
    get("triton")(a)  # an eager step may not write it: a new table
    assert cache.stats["builds"] == builds + 1


def test_first_step_inside_a_capture_says_warm_up(monkeypatch):
    monkeypatch.setattr(K, "CACHE", smes_tables.TableCache())
    monkeypatch.setattr(smes_tables, "capturing", lambda device: True)
    a, _ = _pair([(5,)], [_hyper()])
    with pytest.raises(RuntimeError, match="warm-up"):
        get("triton")(a)


# ------------------------------------------------------------------------ device guard (item 2)


def test_launches_run_under_the_params_device_guard(monkeypatch):
    seen = []
    real = K.device_guard

    def guard(device):
        seen.append(device)
        return real(device)

    monkeypatch.setattr(K, "device_guard", guard)
    a, _ = _pair([(5,)], [_hyper()])
    get("triton")(a)
    assert seen == [CPU]
    g = smes_tables.device_guard(torch.device("cuda", 1))  # built without touching CUDA
    assert isinstance(g, torch.cuda.device) and g.idx == 1


# ------------------------------------------------------------------------ old Triton (item 4)


def test_auto_without_triton_knobs_falls_back():
    """Triton < 3.4 has no triton.knobs: "auto" on a CUDA bucket must choose a backend (or the
    foreach fallback), never raise ImportError; the kernels module must still import."""
    code = """
import sys, triton
del triton.knobs
sys.modules["triton.knobs"] = None
import torch
from smes_fused._bucket import BucketKey
from smes_fused.backends import resolve, get
b = resolve("auto", BucketKey(torch.device("cuda"), torch.float32, torch.float32))
print("auto:", b.name)
print("triton:", get("triton").unavailable())
from smes_fused.triton_kernels import smes
print("interpret:", smes.INTERPRET)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "auto:" in res.stdout and "interpret: False" in res.stdout


def test_old_triton_version_is_reported(monkeypatch):
    import triton

    monkeypatch.setattr(triton, "__version__", "2.3.1")
    why = get("triton").unavailable()
    assert why is not None and "2.3.1" in why
    # "auto" skips it without raising
    cuda = torch.device("cuda")
    assert resolve("auto", BucketKey(cuda, torch.float32, torch.float32)).name != "triton"


# ------------------------------------------------------------------------ torch.compile (item 11)


def test_registered_op_opcheck():
    from smes_fused.triton_kernels import smes_op

    h = _hyper()
    a, _ = _pair([(5,), (3,)], [h, h])
    values, lrs = smes_op.flatten_groups([h])
    args = (a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, [], a.steps, values, lrs, [0, 0],
            [2, 1, 1, 0, 0, 0, 0], None, None)  # fmt: skip
    torch.library.opcheck(
        torch.ops.smes_fused.triton_step_.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )


def test_compiled_step_has_no_graph_break():
    torch._dynamo.reset()
    h = _hyper()
    a, r = _pair([(5,), (3, 4)], [h, h])
    backend = get("triton")

    def step(bucket):
        backend(bucket)

    explain = torch._dynamo.explain(step)(a)
    assert explain.graph_break_count == 0, explain.break_reasons
    get("reference")(r)
    _close(a, r)  # explain ran the step once, through the op
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    compiled(a)
    get("reference")(r)
    _close(a, r)
