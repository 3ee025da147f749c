"""The CPU-side logic of ``python -m bench.gpu_check``: arguments, the phase plan and its budgets,
running jobs under a time limit, the summary, and the exit without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import gpu_check as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100 = G.Gpu("NVIDIA H100 80GB HBM3", (9, 0), 1)
ALL_TOOLS = {"nvcc": "/usr/bin/nvcc", "compute-sanitizer": "/usr/bin/compute-sanitizer"}


def test_args_and_budgets():
    a = G.parse_args(["--out", "x", "--budget", "tests=30", "--skip", "sanitizer", "--no-build"])
    assert a.budgets["tests"] == 30 and a.budgets["bench"] == G.BUDGETS["bench"]
    assert set(a.skip) == {"sanitizer", "build"}
    assert sum(G.BUDGETS.values()) <= G.TOTAL <= 480  # the 8 minutes of the issue
    bads = (
        ["--budget", "nope=3"],
        ["--budget", "tests=-1"],
        ["--budget", "tests=x"],
        ["--budget", "bench=nan"],
        ["--total", "nan"],
        ["--total", "inf"],
    )  # nan passed
    for bad in bads:
        with pytest.raises(SystemExit):
            G.parse_args(["--out", "x", *bad])
    with pytest.raises(SystemExit):
        G.parse_args([])  # --out is required


def test_plan_builds_for_the_local_arch_and_covers_the_issue():
    phases = G.plan(G.parse_args(["--out", "o"]), H100, ALL_TOOLS)
    assert [p.name for p in phases] == list(G.PHASES)
    assert all(p.skip is None for p in phases)
    build = phases[0].jobs[0]
    assert build.env["SMES_CUDA_ARCHS"] == "90"
    assert {"--no-deps", "--no-build-isolation", "--no-index"} <= set(build.argv)
    tests = phases[1].jobs
    assert any("test_cuda_gpu.py" in " ".join(j.argv) for j in tests)
    assert any(j.env.get("SMES_TRITON_DEVICE") == "cuda" for j in tests)
    san = phases[2].jobs
    assert [j.argv[-1] for j in san] == ["triton", "cuda"] and "memcheck" in san[0].argv
    bench = phases[3].jobs
    assert len(bench) == len(G.DTYPES) * len(G.SETS) == 8
    argv = " ".join(bench[0].argv)
    assert "--exponents 0.5 0 -0.08" in argv and "--dtype float32" in argv
    assert {j.argv[j.argv.index("--sets") + 1] for j in bench} == set(G.SETS)


def test_plan_skips_what_it_cannot_run_and_scales_budgets():
    phases = G.plan(
        G.parse_args(["--out", "o", "--total", "100"]),
        H100,
        {"nvcc": None, "compute-sanitizer": None},
    )
    by = {p.name: p for p in phases}
    assert "nvcc" in by["build"].skip and "compute-sanitizer" in by["sanitizer"].skip
    assert sum(p.budget for p in phases) == pytest.approx(100)


def _fake(outcomes: dict, calls: list, clock: list):
    def runner(job, out, timeout):
        calls.append((job.name, round(timeout)))
        status, seconds = outcomes.get(job.name, ("ok", 1.0))
        clock[0] += seconds
        return status, seconds, f"{job.name} said {status}"

    return runner


def test_run_phases_budgets_and_failures(monkeypatch, tmp_path):
    clock = [0.0]
    monkeypatch.setattr(G.time, "perf_counter", lambda: clock[0])
    phases = G.plan(G.parse_args(["--out", str(tmp_path)]), H100, ALL_TOOLS)
    calls: list = []
    # The build fails: tests and sanitizer are skipped, the benchmark still runs (torch's
    # AdamW and the installed backends); bench jobs stop starting once < MIN_BENCH_RUN is left.
    outcomes = {"build": ("failed", 10.0)}
    outcomes.update({j.name: ("ok", 40.0) for j in phases[3].jobs})
    results = G.run_phases(phases, str(tmp_path), G.TOTAL, _fake(outcomes, calls, clock))
    by = {r.phase: r for r in results}
    assert by["build"].status == "failed" and "build said failed" in by["build"].detail
    assert by["tests"].status == "skipped" and by["tests"].detail == "the build failed"
    assert by["sanitizer"].status == "skipped"
    ran = [name for name, _ in calls if name.startswith("bench_")]
    assert len(ran) == 3  # 130 s budget: 40 + 40 + 40, then 10 s left < MIN_BENCH_RUN
    assert by["bench"].status == "ok" and len(by["bench"].skipped_jobs) == 5
    assert "out of time for" in by["bench"].detail
    # each job gets what is left of its phase's budget
    assert calls[1] == ("bench_float32_large", G.BUDGETS["bench"])
    assert calls[2][1] == G.BUDGETS["bench"] - 40


def test_run_phases_total_limit(monkeypatch, tmp_path):
    clock = [0.0]
    monkeypatch.setattr(G.time, "perf_counter", lambda: clock[0])
    phases = G.plan(G.parse_args(["--out", str(tmp_path)]), H100, ALL_TOOLS)
    outcomes = {"build": ("ok", 470.0)}
    results = G.run_phases(phases, str(tmp_path), 480, _fake(outcomes, [], clock))
    by = {r.phase: r for r in results}
    assert by["build"].status == "ok"
    assert by["tests"].status == "ok"  # 10 s left: it runs, cut to what is left
    assert by["bench"].status == "skipped" and by["bench"].detail == "no time left"


def test_run_job_times_out_and_logs(tmp_path):
    job = G.Job("sleepy", [sys.executable, "-c", "print('started', flush=True); import time; "
                           "time.sleep(30)"])  # fmt: skip
    status, seconds, last = G.run_job(job, str(tmp_path), 1.0)
    assert status == "timeout" and seconds < 15
    assert "started" in (tmp_path / "sleepy.log").read_text()
    ok = G.Job("fine", [sys.executable, "-c", "print('3 passed')"])
    assert G.run_job(ok, str(tmp_path), 30)[::2] == ("ok", "3 passed")
    bad = G.Job("bad", [sys.executable, "-c", "raise SystemExit(3)"])
    assert G.run_job(bad, str(tmp_path), 30)[0] == "failed"


def _rows():
    rows = []
    for dtype in G.DTYPES:
        for s in G.SETS:
            for p in G.EXPONENTS:
                for comp, x, pct in (
                    ("AdamW fused", 1.0, 80.0),
                    ("SMES triton", 1.1, 88.0),
                    ("SMES cuda", 0.95, 76.0),
                    ("roofline: D2D copy", 1, 100),
                ):
                    rows.append(dict(param_dtype=dtype, shape_set=s, exponent=p,
                                     competitor=comp, ms_per_step="0.5", gb_per_s="3000",
                                     speedup_vs_fused_adamw=str(x),
                                     pct_of_roofline=str(pct)))  # fmt: skip
    return rows


def test_summary_fits_one_screen():
    results = [
        G.Result("build", "ok", 61.0),
        G.Result("tests", "failed", 90.0, "tests_gpu: failed (1 failed, 40 passed)"),
        G.Result("sanitizer", "skipped", detail="compute-sanitizer not found"),
        G.Result("bench", "timeout", 130.0, skipped_jobs=["bench_bfloat16_llama"]),
    ]
    text = G.summary(H100, results, _rows(), "/tmp/out")
    lines = text.splitlines()
    assert len(lines) <= G.SUMMARY_LINES and max(map(len, lines)) <= 160
    assert "sm_90" in lines[0]
    assert "1.10x" in text and "88% roof" in text and "bfloat16 llama" in text
    assert lines[-1] == "result: FAILED in tests, bench"
    ok = G.summary(H100, [G.Result("build", "ok", 1.0)], [], "/tmp/out")
    assert ok.splitlines()[-1] == "result: all phases that ran passed"


def test_bench_rows_are_read_back(tmp_path):
    from bench import report

    rows = _rows()[:8]
    report.write_csv(rows, str(tmp_path / "bench_float32_large" / "bench_cuda.csv"))
    back = G.bench_rows(str(tmp_path))
    assert len(back) == 8 and G.bench_table(back)


def test_no_gpu_says_so_and_exits_0(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, whatever this machine has
    res = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "o")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no CUDA GPU" in res.stdout


def test_main_end_to_end_with_fake_jobs(monkeypatch, tmp_path, capsys):
    """main() on a (pretend) GPU machine: plan, run, read the benchmark CSVs back, write and
    print the summary; exit 0 when every phase that ran passed."""
    from bench import report

    monkeypatch.setattr(G, "gpu_info", lambda: H100)
    monkeypatch.setattr(G, "tools", lambda: {"nvcc": None, "compute-sanitizer": "/x/cs"})
    ran = []

    def fake(job, out, timeout):
        ran.append(job.name)
        if job.name.startswith("bench_"):
            dtype, s = job.name.split("_", 2)[1:]
            rows = [r for r in _rows() if r["param_dtype"] == dtype and r["shape_set"] == s]
            report.write_csv(rows, os.path.join(out, job.name, "bench_cuda.csv"))
        return "ok", 0.0, "done"

    monkeypatch.setattr(G, "run_job", fake)
    out = tmp_path / "o"
    assert G.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    text = (out / "summary.txt").read_text()
    assert text.strip() in printed
    assert "build     skipped" in text and "nvcc not found" in text
    assert ran[:3] == ["tests_gpu", "tests_triton", "sanitizer_triton"]
    assert text.count("1.10x") == len(G.DTYPES) * len(G.SETS) * len(G.EXPONENTS)
    assert text.splitlines()[-1] == "result: all phases that ran passed"
