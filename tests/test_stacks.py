"""SMES inside training stacks (issue 13): DDP, ZeroRedundancyOptimizer, FSDP2,
torch.distributed.checkpoint, GradScaler, SWA, Lightning, the HF Trainer, and the scripts in
examples/ (README "Training stacks" lists what each test covers).

The distributed tests run 2 gloo ranks on 127.0.0.1 (tests/_dist.py: a free port picked at run
time, a process-group timeout, and a hard deadline after which the ranks are killed). To keep
the module fast, one spawn runs every distributed case on both ranks and each test reads its
case's result; a case that raises is reported by its own test only.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import pickle
import tempfile
import time
import traceback

import pytest
import torch
from _dist import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
CPU_BACKENDS = ("reference", "foreach", "cpu")
STEPS = 3  # steps of the DDP/FSDP2 comparisons
RESUME_AT, RESUME_MORE = 2, 2  # DCP: save after 2 steps, then 2 more
EXPONENT = -0.08


def _load_example(name: str):
    """examples/NAME.py as a module named smes_example_NAME (examples/ is not put on sys.path:
    examples/lightning.py would shadow the lightning package)."""
    spec = importlib.util.spec_from_file_location(
        f"smes_example_{name}", os.path.join(EXAMPLES, f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------ the distributed cases
# Module-level functions: the spawned ranks import this module and call them by name.


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 31 outputs: an uneven Shard(0) split (16 + 15 rows) under FSDP2.
    return torch.nn.Sequential(torch.nn.Linear(16, 31), torch.nn.Tanh(), torch.nn.Linear(31, 8))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)


def _loss(model, rank, step):
    x, y = _batch(rank, step)
    return torch.nn.functional.mse_loss(model(x), y)


def _smes(params, backend, exponent=EXPONENT):
    from smes_fused import SMES, lr_for_exponent

    return SMES(params, lr=lr_for_exponent(exponent), exponent=exponent, backend=backend)


def _full(model) -> list[torch.Tensor]:
    """Every parameter as a full plain tensor (DTensors are gathered)."""
    out = []
    for p in model.parameters():
        p = p.detach()
        if hasattr(p, "full_tensor"):
            p = p.full_tensor()
        out.append(p.clone())
    return out


def _single_process(backend, steps, world_size, make_opt=None) -> list[torch.Tensor]:
    """The same training without any distribution: each step's grad is the ranks' average."""
    model = _model()
    opt = (make_opt or (lambda ps: _smes(ps, backend)))(list(model.parameters()))
    for step in range(steps):
        grads = []
        for r in range(world_size):
            model.zero_grad(set_to_none=True)
            _loss(model, r, step).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for i, p in enumerate(model.parameters()):
            p.grad = sum(g[i] for g in grads) / world_size
        opt.step()
    return _full(model)


def _fsdp2(seed=0, dim=0):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def placement(p):  # None: the default, Shard(0); FSDP2 shards dim 1 only evenly
        return Shard(1) if dim == 1 and p.ndim == 2 and p.shape[1] % 2 == 0 else None

    model = _model(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, shard_placement_fn=placement)
    fully_shard(model, shard_placement_fn=placement)
    return model


def _train(model, opt, rank, steps, first_step=0):
    for step in range(first_step, first_step + steps):
        opt.zero_grad(set_to_none=True)
        _loss(model, rank, step).backward()
        opt.step()


def _case_ddp(rank, world_size, backend):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model())
    opt = _smes(model.parameters(), backend)
    _train(model, opt, rank, STEPS)
    return _full(model.module), _single_process(backend, STEPS, world_size)


def _case_zero(rank, world_size, backend):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from smes_fused import SMES, lr_for_exponent

    model = DDP(_model())
    opt = ZeroRedundancyOptimizer(
        model.parameters(),
        optimizer_class=SMES,
        lr=lr_for_exponent(EXPONENT),
        exponent=EXPONENT,
        backend=backend,
    )
    _train(model, opt, rank, STEPS)
    return _full(model.module), _single_process(backend, STEPS, world_size)


def _case_fsdp2(rank, world_size, backend, dim=0):
    from torch.distributed.tensor import DTensor, Shard

    model = _fsdp2(dim=dim)
    assert any(p.placements == (Shard(dim),) for p in model.parameters() if p.ndim == 2)
    opt = _smes(model.parameters(), backend)
    _train(model, opt, rank, STEPS)
    for p in model.parameters():  # state as DTensors placed like the param; step plain
        st = opt.state[p]
        assert not isinstance(st["step"], DTensor), "step is a DTensor"
        for k in ("exp_avg", "exp_avg_sq"):
            assert isinstance(st[k], DTensor), f"{k} is not a DTensor"
            assert st[k].placements == p.placements, f"{k}: {st[k].placements}"
    return _full(model), _single_process(backend, STEPS, world_size)


def _case_fsdp2_shard1(rank, world_size, backend):
    """The first weight sharded on dim 1 (8 + 8 of its 16 columns), the rest on dim 0."""
    return _case_fsdp2(rank, world_size, backend, dim=1)


def _case_fsdp2_adamw(rank, world_size, backend):
    from smes_fused import SMES

    lr, wd = 1e-2, 1e-2
    results = []
    for make in (
        lambda ps: SMES(ps, lr=lr, weight_decay=wd, exponent=0.5, backend=backend),
        lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, foreach=False),
    ):
        model = _fsdp2()
        _train(model, make(model.parameters()), rank, STEPS)
        results.append(_full(model))
    return tuple(results)


def _case_dcp_resume(rank, world_size, backend, ckpt_dir):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    total = RESUME_AT + RESUME_MORE
    # Uninterrupted.
    model = _fsdp2()
    opt = _smes(model.parameters(), backend)
    _train(model, opt, rank, total)
    straight = _full(model)
    # Interrupted: RESUME_AT steps, save, a fresh model (another init) + optimizer, load, go on.
    model = _fsdp2()
    opt = _smes(model.parameters(), backend)
    _train(model, opt, rank, RESUME_AT)
    msd, osd = get_state_dict(model, opt)
    path = os.path.join(ckpt_dir, backend)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    dist.barrier()
    del model, opt, msd, osd
    model = _fsdp2(seed=1)
    opt = _smes(model.parameters(), backend)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    _train(model, opt, rank, RESUME_MORE, first_step=RESUME_AT)
    return straight, _full(model)


def _case_fsdp2_clip(rank, world_size, backend):
    """Fused clipping with FSDP2: the norm of the whole (sharded) gradient, every step clipped."""
    from smes_fused import SMES

    def make(ps):
        return SMES(ps, lr=1e-2, exponent=EXPONENT, max_grad_norm=0.05, backend=backend)

    model = _fsdp2()
    opt = make(model.parameters())
    norms = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _loss(model, rank, step).backward()
        opt.step()
        norms.append(opt.grad_norm.clone())
    return _full(model), _single_process(backend, STEPS, world_size, make), norms


def _case_sr_shards(rank, world_size, backend):
    """bf16 params with stochastic rounding, one step on the same values and gradients on both
    ranks: a Shard(0) weight whose two halves are alike (FSDP2), and a replicated DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    from smes_fused import SMES

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight[16:] = lin.weight[:16]  # rank 1's shard (rows 16..31) = rank 0's (0..15)
    fully_shard(lin)
    mesh = init_device_mesh("cpu", (world_size,))
    rep = torch.nn.Parameter(distribute_tensor(torch.randn(16, 64).bfloat16(), mesh, [Replicate()]))
    g = torch.Generator().manual_seed(7)  # the same gradients on both ranks
    for p in (lin.weight, rep):
        local = torch.randn(p.to_local().shape, generator=g).bfloat16()
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements)
    opt = SMES([lin.weight, rep], lr=3e-3, stochastic_rounding=True, rounding_seed=5,
               backend=backend)  # fmt: skip
    opt.step()
    return [p.to_local().detach().clone() for p in (lin.weight, rep)]


CASES = (
    [("ddp", b) for b in CPU_BACKENDS]
    + [("zero", b) for b in CPU_BACKENDS]
    + [("fsdp2", b) for b in CPU_BACKENDS]
    + [("fsdp2_shard1", b) for b in CPU_BACKENDS]
    + [("fsdp2_adamw", "auto")]
    + [("dcp_resume", b) for b in CPU_BACKENDS]
    + [("sr_shards", b) for b in CPU_BACKENDS]
    + [("fsdp2_clip", b) for b in CPU_BACKENDS]
    + [("example", "auto")]
)


def _case_example(rank, world_size, backend, ckpt_dir):
    mod = _load_example("fsdp2_dcp_resume")
    return mod.resume_is_bit_identical(rank, os.path.join(ckpt_dir, "example"))


def _all_cases(rank, world_size, ckpt_dir):
    """Every case on this rank; a case that raises is recorded and the next one runs."""
    out = {}
    for name, backend in CASES:
        fn = globals()[f"_case_{name}"]
        args = (ckpt_dir,) if name in ("dcp_resume", "example") else ()
        t0 = time.perf_counter()
        try:
            out[name, backend] = ("ok", fn(rank, world_size, backend, *args))
        except Exception:
            out[name, backend] = ("error", traceback.format_exc())
        out[name, backend] += (time.perf_counter() - t0,)
    return out


@pytest.fixture(scope="module")
def dist_results():
    with tempfile.TemporaryDirectory(prefix="smes_dcp_") as ckpt_dir:
        return run_ranks(_all_cases, ckpt_dir, world_size=2, timeout=150, pg_timeout=30)


def _result(dist_results, name, backend):
    per_rank = []
    for rank, res in enumerate(dist_results):
        status, value, _ = res[name, backend]
        if status == "error":
            pytest.fail(f"{name}[{backend}] raised on rank {rank}:\n{value}", pytrace=False)
        per_rank.append(value)
    return per_rank


def _assert_equal_lists(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what}: param {i} differs, max |diff| {(x - y).abs().max()}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ddp_equals_single_process(dist_results, backend):
    """DDP (2 gloo ranks) = one process stepping on the ranks' averaged gradient, bit for bit."""
    for dist_params, single in _result(dist_results, "ddp", backend):
        _assert_equal_lists(dist_params, single, f"DDP[{backend}] vs single process")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_redundancy_equals_single_process(dist_results, backend):
    """ZeroRedundancyOptimizer(optimizer_class=SMES) over DDP = one process on the averaged
    gradient, bit for bit (each rank steps its partition, then broadcasts it)."""
    for dist_params, single in _result(dist_results, "zero", backend):
        _assert_equal_lists(dist_params, single, f"ZeRO[{backend}] vs single process")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fsdp2_equals_single_process(dist_results, backend):
    """FSDP2 (fully_shard, Shard(0), an uneven split) = one process on the averaged gradient;
    the optimizer state stays DTensors."""
    for dist_params, single in _result(dist_results, "fsdp2", backend):
        _assert_equal_lists(dist_params, single, f"FSDP2[{backend}] vs single process")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fsdp2_shard1_equals_single_process(dist_results, backend):
    """FSDP2 with a Shard(1) weight (shard_placement_fn): the same."""
    for dist_params, single in _result(dist_results, "fsdp2_shard1", backend):
        _assert_equal_lists(dist_params, single, f"FSDP2 Shard(1)[{backend}] vs single process")


def test_fsdp2_exponent_half_equals_adamw(dist_results):
    """exponent=0.5 under FSDP2 (default backend) matches FSDP2 + torch.optim.AdamW."""
    for smes, adamw in _result(dist_results, "fsdp2_adamw", "auto"):
        for x, y in zip(smes, adamw):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fsdp2_dcp_resume_bit_identical(dist_results, backend):
    """get_state_dict → dcp.save after 2 steps, dcp.load → set_state_dict into a fresh FSDP2
    model + SMES, 2 more steps: bit-identical to 4 uninterrupted steps."""
    for straight, resumed in _result(dist_results, "dcp_resume", backend):
        _assert_equal_lists(straight, resumed, f"DCP resume[{backend}]")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fsdp2_clipping_equals_single_process(dist_results, backend):
    """max_grad_norm under FSDP2: the norm of the whole gradient (the shards' norms combined
    across ranks), so the clipped steps are those of one process on the averaged gradient."""
    for dist_params, single, norms in _result(dist_results, "fsdp2_clip", backend):
        assert all(float(n) > 0.05 for n in norms)  # clipped every step
        for x, y in zip(dist_params, single):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_noise_per_shard(dist_results, backend):
    """Stochastic rounding of sharded bf16 params: each shard draws its own noise (two alike
    shards of an FSDP2 weight round differently: the seed is salted with the shard's offset in
    the whole param), replicas of one shard draw the same (a replicated DTensor stays equal on
    every rank), and every backend draws the same bits."""
    (w0, rep0), (w1, rep1) = _result(dist_results, "sr_shards", backend)
    differ = (w0.view(torch.int16) != w1.view(torch.int16)).double().mean().item()
    assert differ > 0.1, f"the two shards' rounding agree in {1 - differ:.1%} of the elements"
    assert torch.equal(rep0.view(torch.int16), rep1.view(torch.int16))
    ref = _result(dist_results, "sr_shards", "reference")
    for i, (mine, theirs) in enumerate(zip((w0, rep0, w1, rep1), (*ref[0], *ref[1]))):
        assert torch.equal(mine.view(torch.int16), theirs.view(torch.int16)), f"tensor {i}"


# ------------------------------------------------------------------------ single process


def test_swa_with_swalr_matches_adamw():
    """SWA: AveragedModel + SWALR (a float lr annealed every step) on SMES(exponent=0.5) gives
    the averaged model of AdamW's run."""
    from torch.optim.swa_utils import SWALR, AveragedModel

    from smes_fused import SMES

    averaged = []
    for make in (
        lambda ps: SMES(ps, lr=1e-2, exponent=0.5),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    ):
        model = _model()
        swa_model = AveragedModel(model)
        opt = make(model.parameters())
        sched = SWALR(opt, swa_lr=5e-3, anneal_epochs=3)
        for step in range(6):
            opt.zero_grad()
            _loss(model, 0, step).backward()
            opt.step()
            if step >= 2:
                swa_model.update_parameters(model)
                sched.step()
        averaged.append([p.detach().clone() for p in swa_model.module.parameters()])
    for x, y in zip(*averaged):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("amp_unscale", ["step", "scaler"])
def test_grad_scaler_matches_adamw(amp_unscale):
    """torch.amp.GradScaler with SMES(exponent=0.5) = with AdamW, an overflowing step skipped.
    "step" (default): the scaler hands SMES grad_scale/found_inf and SMES unscales in step().
    "scaler": the scaler unscales (unscale_), the grads are clipped, then SMES steps."""
    from smes_fused import SMES

    finals = []
    for make in (
        lambda ps: SMES(ps, lr=1e-2, exponent=0.5, amp_unscale=amp_unscale),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    ):
        model = _model()
        opt = make(list(model.parameters()))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step in range(5):
            opt.zero_grad()
            scaler.scale(_loss(model, 0, step)).backward()
            if step == 2:  # an overflow: the scaler skips this step and halves its scale
                model[0].weight.grad[0, 0] = float("inf")
            if amp_unscale == "scaler":
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        assert scaler.get_scale() == 2.0**9
        finals.append([p.detach().clone() for p in model.parameters()])
    for x, y in zip(*finals):
        torch.testing.assert_close(x, y)


# ------------------------------------------------------------------------ the examples


def test_example_fsdp2_dcp_resume(dist_results):
    """examples/fsdp2_dcp_resume.py's demo (resume_is_bit_identical), run on the ranks of the
    shared spawn: prints and returns True. `python examples/fsdp2_dcp_resume.py` adds only
    its own spawn around it."""
    assert _result(dist_results, "example", "auto") == [True, True]


def test_example_lightning_bf16_clip_with_scaler_unscale():
    """Lightning, precision="bf16-mixed" + gradient_clip_val=1.0, SMES(amp_unscale="scaler"):
    trains, and the loss goes down."""
    losses = _load_example("lightning").main(amp_unscale="scaler")
    assert len(losses) >= 2 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_lightning_refuses_default_amp_unscale_with_clipping():
    """With the default amp_unscale="step", SMES unscales inside step(), so Lightning cannot
    clip the unscaled gradients and says so: why amp_unscale="scaler" exists."""
    from smes_fused import SMES

    mod = _load_example("lightning")

    class DefaultSMES(mod.Regression):
        def configure_optimizers(self):
            return SMES(self.parameters(), lr=1e-2, exponent=mod.EXPONENT)

    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        mod.fit(DefaultSMES())
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        mod.fit(mod.Regression(amp_unscale="step"))


def test_amp_unscale_scaler_flag():
    """amp_unscale="scaler" turns off the instance's _step_supports_amp_scaling (kept by copies
    and pickles); other values are refused."""
    from smes_fused import SMES

    p = [torch.nn.Parameter(torch.zeros(3))]
    assert SMES(p)._step_supports_amp_scaling
    assert SMES(p, amp_unscale="step")._step_supports_amp_scaling
    opt = SMES(p, amp_unscale="scaler")
    assert not opt._step_supports_amp_scaling
    assert not copy.deepcopy(opt)._step_supports_amp_scaling
    assert not pickle.loads(pickle.dumps(opt))._step_supports_amp_scaling
    with pytest.raises(ValueError, match="amp_unscale"):
        SMES(p, amp_unscale="grad")


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_example_hf_trainer(how):
    """HF Trainer with SMES passed as an instance (optimizers=) and as a class
    (optimizer_cls_and_kwargs=): trains, the loss goes down, the optimizer is SMES."""
    from smes_fused import SMES

    opt, losses = _load_example("hf_trainer").train(how)
    assert isinstance(opt, SMES)
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
