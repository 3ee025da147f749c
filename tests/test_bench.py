"""Smoke test of the benchmark suite: ``python -m bench --quick`` runs, prints the table and
writes a CSV with the expected columns and rows, and a PNG. Times are not checked."""

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import cli, report, shapes  # noqa: E402
from bench.competitors import REFERENCE, smes_backends  # noqa: E402


def test_model_shape_sets_have_the_published_parameter_counts():
    for name, count in shapes.FULL_PARAMS.items():
        assert shapes.shape_set(name, "full").n_params == count, name


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
def test_quick_run_writes_table_csv_and_plot(tmp_path, device):
    cmd = [sys.executable, "-m", "bench", "--quick", "--device", device, "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "x fused" in done.stdout  # the table's header

    with open(tmp_path / f"bench_{device}_quick.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == report.COLUMNS
        rows = list(reader)
    png = tmp_path / f"bench_{device}_quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    backends = [b for b, why in smes_backends(torch.device(device), None).items() if why is None]
    first = cli.QUICK_EXPONENTS[0]
    for name in shapes.QUICK_SETS:
        for p in cli.QUICK_EXPONENTS:
            cell = [r for r in rows if r["shape_set"] == name and float(r["exponent"]) == p]
            got = {r["competitor"] for r in cell}
            expected = {REFERENCE, *(f"SMES {b}" for b in backends)}
            if p == first:
                expected |= {"AdamW foreach", "AdamW for-loop"}
            assert expected <= got, (name, p, got)
            assert sum(n.startswith("roofline") for n in got) == 1
            for r in cell:
                assert float(r["ms_per_step"]) > 0 and float(r["gb_per_s"]) > 0
                assert int(r["state_bytes"]) > 0
                assert r["device"] == device and r["threads"] and r["torch"]
                want = 20 if p == 0 and r["competitor"].startswith("SMES") else None
                assert want is None or int(r["bytes_per_param"]) == want
            fused = next(r for r in cell if r["competitor"] == REFERENCE)
            assert float(fused["speedup_vs_fused_adamw"]) == 1.0


def test_compute_floor_runs(capsys):
    from smes_fused import _ops

    if not _ops.HAVE_C:
        pytest.skip(f"compiled extension missing: {_ops.unavailable_reason()}")
    from bench import compute_floor

    compute_floor.main(["--elements", "32768", "--repeats", "3", "--exponents", "0.5", "0.37"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU kernel set: ")
    # A line per exponent: its cost, or, where load made a call no longer than the fixed cost
    # measured apart (seen in CI with 2048 elements), "not measurable" (report() is tested
    # below): the run itself must not depend on the machine's load.
    assert [x.split(":")[0] for x in lines[1:]] == ["p = 0.5", "p = 0.37"], lines
    for x in lines[1:]:
        assert "ns/element" in x or "not measurable" in x, x


def test_compute_floor_report_never_prints_a_negative_cost():
    from bench.compute_floor import report

    us = 1e-6
    assert report({0.5: 30 * us, 0.37: 50 * us}, 10 * us, 10**4) == [
        "p = 0.5: 2.000 ns/element  (1.00x p = 0.5)",
        "p = 0.37: 4.000 ns/element  (2.00x p = 0.5)",
    ]
    # under load the fixed cost (measured apart) can exceed a whole call: no negative costs
    out = report({0.5: 9 * us, 0.37: 50 * us}, 10 * us, 10**4)
    assert out[0].startswith("p = 0.5: not measurable: the call (9.0 us) took no longer")
    assert out[1] == "p = 0.37: 4.000 ns/element"  # no ratio to an unmeasured p = 0.5


def test_summary_table_from_csv_rows():
    from bench import summary

    def row(s, e, comp, x, ms, roof):
        return {"shape_set": s, "n_params": "16000000", "n_tensors": "2", "exponent": e,
                "competitor": comp, "speedup_vs_fused_adamw": x, "ms_per_step": ms,
                "pct_of_roofline": roof}  # fmt: skip

    rows = [
        row("large", "0.5", "AdamW fused", "1", "6.0", "90"),
        row("large", "0.5", "SMES cpu", "1.2", "5.0", "99"),
        row("large", "-0.08", "AdamW fused", "1", "6.0", "90"),
        row("large", "-0.08", "SMES cpu", "0.8", "7.5", "70"),
        row("large", "0.37", "AdamW fused", "1", "6.0", "90"),
        row("large", "0.37", "SMES cpu", "0.996", "6.0", "99"),
    ]
    md = summary.markdown(rows).splitlines()
    assert md[0] == "| shape set | params / tensors | p = 0.5 | p = -0.08 | p = 0.37 |"
    assert md[2] == (
        "| large | 16.0M / 2 | 1.20× (5.0 vs 6.0 ms, 99%) | **0.80×** (7.5 vs 6.0 ms, 70%) | "
        "1.00× (6.0 vs 6.0 ms, 99%) |"
    )
    with pytest.raises(SystemExit, match="no 'SMES cuda' rows"):
        summary.markdown(rows, "cuda")
    # no roofline (16-bit params on CPU): no share, rather than "nan%"
    bf16 = [row("large", "0.5", "AdamW fused", "1", "6.0", "nan"),
            row("large", "0.5", "SMES cpu", "1.2", "5.0", "nan")]  # fmt: skip
    assert summary.markdown(bf16).splitlines()[2] == "| large | 16.0M / 2 | 1.20× (5.0 vs 6.0 ms) |"


def test_competitors_of_a_cell_share_state_memory_and_stay_finite():
    from bench import runner
    from bench.competitors import specs
    from bench.shapes import ShapeSet

    dev = torch.device("cpu")
    params = runner._allocate(ShapeSet("t", ((33,), (5, 7), (33,)), ""), dev)
    cell = specs(dev, 0.37, ["cpu", "foreach"], unfused_adamw=True, compile=False)
    ready = [runner._set_up(spec, params, dev) for spec in cell]
    runner._share_state(ready)

    def buffers(r):
        return [t for (_, role), t in r.state().items() if role != "step"]

    first = ready[0].state()  # fused AdamW: every (param, role) but the roofline's
    for r in ready:
        ptrs = [t.data_ptr() for t in buffers(r)]
        assert len(set(ptrs)) == len(ptrs), r.spec.name  # never two tensors on one buffer
        for key, t in r.state().items():
            if key[1] != "step":
                assert t.data_ptr() == first[key].data_ptr(), (r.spec.name, key)
    steps = [t for r in ready for (_, role), t in r.state().items() if role == "step"]
    assert len({t.data_ptr() for t in steps}) == len(steps)  # step counts stay separate
    for _ in range(3):
        for r in ready:
            r.step()
    for t in params + [t for r in ready for t in r.state().values()]:
        assert torch.isfinite(t).all()


def test_projection_run_counts_two_passes_for_matrices(tmp_path):
    """``--projection``: SMES runs with projection=True; tensors of dim > 1 move 40 B per float32
    parameter (two passes), others 28, and B/param is their mean over the set."""
    from bench.competitors import bytes_per_param

    assert bytes_per_param(0.5) == 28 and bytes_per_param(0.0) == 20
    assert bytes_per_param(0.5, projected=1.0) == 40 and bytes_per_param(0.0, projected=1.0) == 28
    assert bytes_per_param(-0.08, projected=0.5) == 34
    cmd = [sys.executable, "-m", "bench", "--device", "cpu", "--projection", "--sets", "vgg16",
           "--exponents", "0.5", "--repeats", "2", "--warmup", "0", "--backends", "cpu",
           "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "bench_cpu_projection.csv", newline="") as f:
        every = list(csv.DictReader(f))
    # quartiles within the timings (at 2 repeats the default method put q1 below 0)
    for r in every:
        assert 0 < float(r["ms_q1"]) <= float(r["ms_per_step"]) <= float(r["ms_q3"]), r
    rows = [r for r in every if r["competitor"] == "SMES cpu"]
    assert rows and all(r["projection"] == "True" for r in rows)
    assert all(36 < float(r["bytes_per_param"]) <= 40 for r in rows)  # mostly matrices


def test_clip_run_compares_clipped_steps(tmp_path):
    """``--clip``: AdamW after clip_grad_norm_ (40 B per float32 parameter) against SMES with
    max_grad_norm (32 B: the norm's read, the coefficient applied in the step's read of g)."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--clip", "1.0",
           "--backends", "cpu", "--exponents", "0.5", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "bench_cpu_quick_clip.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    fused = [r for r in rows if r["competitor"] == REFERENCE]
    smes = [r for r in rows if r["competitor"] == "SMES cpu"]
    assert fused and smes and all(float(r["clip"]) == 1.0 for r in fused + smes)
    assert {float(r["bytes_per_param"]) for r in fused} == {40.0}
    assert {float(r["bytes_per_param"]) for r in smes} == {32.0}


def test_bf16_params_with_float32_state(tmp_path):
    """``--dtype bfloat16 --state-dtype float32``: SMES keeps float32 state for bf16 params
    (22 B per parameter), fused AdamW its bf16 state (14 B)."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--dtype", "bfloat16",
           "--state-dtype", "float32", "--backends", "cpu", "--exponents", "-0.08",
           "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "bench_cpu_quick_bfloat16_f32state.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    smes = [r for r in rows if r["competitor"] == "SMES cpu"]
    fused = [r for r in rows if r["competitor"] == REFERENCE]
    assert smes and {r["smes_state_dtype"] for r in smes} == {"float32"}
    assert "no roofline for 16-bit params on CPU" in done.stdout
    assert "skipped" not in done.stdout + done.stderr  # the float32 roofline op is not tried
    assert {float(r["bytes_per_param"]) for r in smes} == {22.0}
    assert {float(r["bytes_per_param"]) for r in fused} == {14.0}


def test_bf16_rounding_demo_runs(tmp_path, capsys):
    from bench import bf16_rounding

    args = ["--exponents", "-0.08", "--seeds", "1", "--steps", "3", "--out", str(tmp_path)]
    assert bf16_rounding.main(args) == 0
    with open(tmp_path / "bf16_rounding.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["mode"] for r in rows} == set(bf16_rounding.MODES)
    assert "bf16 stochastic" in capsys.readouterr().out


def test_stochastic_rounding_run_beside_round_to_nearest(tmp_path):
    """``--dtype bfloat16 --stochastic-rounding``: each SMES backend also runs with
    stochastic_rounding=True ('SMES cpu SR'), in the same cells and with the same bytes."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--dtype", "bfloat16",
           "--stochastic-rounding", "--backends", "cpu", "--exponents", "-0.08",
           "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stochastic_rounding=True" in done.stdout
    with open(tmp_path / "bench_cpu_quick_bfloat16_sr.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cells = {(r["shape_set"], r["exponent"]) for r in rows}
    for name in ("SMES cpu", "SMES cpu SR"):
        mine = [r for r in rows if r["competitor"] == name]
        assert {(r["shape_set"], r["exponent"]) for r in mine} == cells
        assert {float(r["bytes_per_param"]) for r in mine} == {14.0}
        assert all(float(r["speedup_vs_fused_adamw"]) > 0 for r in mine)


@pytest.mark.parametrize(
    "module, flags, words",
    [
        ("bench", ["--clip", "0"], "--clip: must be > 0"),
        ("bench", ["--clip", "nan"], "--clip: must be > 0"),
        ("bench", ["--exponents", "nan"], "--exponents: must be finite"),
        ("bench", ["--repeats", "0"], "--repeats: must be at least 1"),
        ("bench", ["--out", os.path.join(ROOT, "README.md")], "exists and is not a folder"),
        ("bench.in_backward", ["--steps", "0"], "--steps: must be at least 1"),
        ("bench.compute_floor", ["--elements", "0"], "--elements: must be at least 1"),
        ("bench.bf16_rounding", ["--seeds", "0"], "--seeds: must be at least 1"),
        ("bench.summary", ["no_such.csv"], "cannot read no_such.csv"),
        ("bench", ["--backends", "bogus"], "--backends: unknown backend 'bogus'"),
        ("bench", ["--sets", "large", "large"], "--sets: a value is given more than once"),
        ("bench", ["--out", os.path.join(ROOT, "README.md", "sub")], "cannot make the folder"),
        ("bench.in_backward", ["--models", "mlp", "foo"], "--models: invalid choice: 'foo'"),
        ("bench.in_backward", ["--bucket-mb", "-1"], "--bucket-mb: must be a finite number"),
        ("bench.in_backward", ["--backend", "bogus"], "--backend: unknown backend"),
        ("bench.in_backward", ["--suffix", "a/b"], "--suffix: must be a plain name"),
        ("bench.in_backward", ["--width", "0"], "--width: must be at least 1"),
        ("bench.bf16_rounding", ["--adamw-lr", "-1"], "--adamw-lr: must be > 0"),
        ("bench.bf16_rounding", ["--backend", "bogus"], "--backend: unknown backend"),
        ("bench.summary", [os.path.join(ROOT, "results", "bench_cpu.png")], "is not a CSV"),
    ],
)
def test_bad_flags_are_usage_errors(module, flags, words, capsys):
    """Bad values end in a usage error naming the flag, before any work (they were accepted
    and every SMES cell skipped with exit code 0, or a traceback came at the end of the run,
    its results lost)."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module if module != "bench" else "bench.cli").main(flags)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_explicit_cuda_without_a_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cuda"])
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_compiled_adamw_clips_when_asked():
    """``--compile --clip``: the compiled AdamW runs clip_grad_norm_ too (it did not, and was
    billed the 40 B of a clipped step)."""
    from bench.competitors import specs

    spec = next(s for s in specs(torch.device("cpu"), 0.5, (), unfused_adamw=False,
                                 compile=True, clip=1.0) if s.name == "AdamW compiled")  # fmt: skip
    params = [torch.zeros(100, requires_grad=True)]
    params[0].grad = torch.full((100,), 10.0)
    step, _ = spec.build(params)
    step()
    assert float(params[0].grad.norm()) == pytest.approx(1.0, rel=1e-4)
    assert spec.bytes_per_param == 40


@pytest.mark.parametrize("flags", [["--stochastic-rounding"], ["--state-dtype", "float32"]])
def test_bf16_only_flags_need_bf16_params(flags, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--dtype", "float32", *flags])
    assert e.value.code == 2
    assert "needs --dtype bfloat16" in capsys.readouterr().err


def test_summary_of_a_csv_without_a_needed_column_is_a_usage_error(tmp_path, capsys):
    """A CSV with a column of the table missing, or a value that is not a number: a usage
    error naming it, nothing printed to stdout (they were tracebacks: KeyError, ValueError)."""
    from bench import summary

    with open(os.path.join(ROOT, "results", "bench_cpu.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    for drop, bad in (("command", None), (None, "ms_per_step")):
        fields = [k for k in rows[0] if k != drop]
        path = tmp_path / f"cut_{drop}_{bad}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({**r, bad: "abc"} if bad else r)
        with pytest.raises(SystemExit) as e:
            summary.main([str(path)])
        assert e.value.code == 2
        out = capsys.readouterr()
        words = "lacks the column(s) command" if drop else "not a number"
        assert out.out == "" and words in out.err
