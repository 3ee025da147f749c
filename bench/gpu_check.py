"""python -m bench.gpu_check --out DIR: the one-command GPU check of smes-fused.

Meant for a bare GPU machine with no network (an H100/H200 with Python, torch built for CUDA,
Triton, nvcc, pytest and compute-sanitizer installed). Four phases, each with its own time
budget (seconds, ``--budget PHASE=S``), all within ``--total`` (default 480 s = 8 minutes):

  build      ``pip install --no-deps --no-build-isolation --no-index -e .`` with the CUDA kernels
             compiled for this GPU's architecture only (``SMES_CUDA_ARCHS``).
  tests      pytest on the GPU: tests/test_cuda_gpu.py ("triton" and "cuda" against "reference"
             for every variant and dtype, grad_scale/found_inf and GradScaler, capturable steps
             and a whole training step captured in a CUDA graph after zero_grad(set_to_none=True),
             device lr tensors, DTensor on a 1-GPU mesh) and tests/test_triton.py with the kernels
             compiled for the GPU (SMES_TRITON_DEVICE=cuda).
  sanitizer  compute-sanitizer --tool memcheck on one small step per GPU backend.
  bench      python -m bench against torch.optim.AdamW(fused=True): sets large, many_small,
             gpt2, llama; p = 0.5, 0, -0.08; float32 then bfloat16 params; with the
             device-to-device copy roofline. One process per (dtype, set), so a run cut short by
             its budget keeps what it measured.

Everything lands in DIR: one log per phase (build.log, tests.log, sanitizer_<backend>.log,
bench_<dtype>_<set>.log), the benchmark CSVs and PNGs, and summary.txt, the one-screen summary
that is also printed. A phase that cannot run (no nvcc, no compute-sanitizer, an earlier phase
failed, no time left) is reported as skipped with the reason. Without a CUDA GPU the script says
so and exits 0. Exit status: 0 when every phase that ran passed, else 1.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import math
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("build", "tests", "sanitizer", "bench")
BUDGETS = {"build": 150, "tests": 120, "sanitizer": 60, "bench": 130}  # 460 s of the 480
TOTAL = 480
SETS = ("large", "many_small", "gpt2", "llama")
EXPONENTS = ("0.5", "0", "-0.08")
DTYPES = ("float32", "bfloat16")
GPU_BACKENDS = ("triton", "cuda")
MIN_BENCH_RUN = 20  # seconds: a bench process with less left is skipped, not started
SUMMARY_LINES = 40


@dataclasses.dataclass
class Gpu:
    name: str
    capability: tuple[int, int]
    count: int

    @property
    def arch(self) -> str:
        return f"{self.capability[0]}{self.capability[1]}"


@dataclasses.dataclass
class Job:
    """One subprocess of a phase."""

    name: str  # also the log's stem
    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Phase:
    name: str
    budget: float
    jobs: list[Job] = dataclasses.field(default_factory=list)
    skip: str | None = None  # why it will not run


@dataclasses.dataclass
class Result:
    phase: str
    status: str  # "ok", "failed", "timeout", "skipped"
    seconds: float = 0.0
    detail: str = ""
    skipped_jobs: list[str] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------ arguments


def _budget(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in PHASES or not value:
        raise argparse.ArgumentTypeError(f"expected PHASE=SECONDS with PHASE in {PHASES}")
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and seconds >= 0):  # nan passed `< 0`
        raise argparse.ArgumentTypeError(f"a budget is a finite number >= 0, got {value!r}")
    return name, seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="directory for logs, CSVs, PNGs and summary.txt")
    p.add_argument(
        "--budget",
        type=_budget,
        action="append",
        default=[],
        metavar="PHASE=S",
        help="seconds for one phase (default: "
        + ", ".join(f"{k}={v}" for k, v in BUDGETS.items())
        + ")",
    )
    p.add_argument("--total", type=float, default=TOTAL, help="seconds for everything (480)")
    p.add_argument("--skip", action="append", default=[], choices=PHASES, help="leave a phase out")
    p.add_argument(
        "--no-build",
        action="store_true",
        help="use the installed extension as it is (same as --skip build)",
    )
    p.add_argument("--one-step", choices=GPU_BACKENDS, help=argparse.SUPPRESS)  # sanitizer job
    args = p.parse_args(argv)
    if not (math.isfinite(args.total) and args.total > 0):
        p.error(f"--total must be a finite number > 0, got {args.total}")
    if args.no_build and "build" not in args.skip:
        args.skip.append("build")
    args.budgets = {**BUDGETS, **dict(args.budget)}
    return args


# ------------------------------------------------------------------------------ the plan


def tools() -> dict[str, str | None]:
    """Paths of the external tools the phases need (None when missing)."""

    def find(name: str) -> str | None:
        found = shutil.which(name)
        if found:
            return found
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home and os.path.exists(os.path.join(home, "bin", name)):
                return os.path.join(home, "bin", name)
        return None

    return {"nvcc": find("nvcc"), "compute-sanitizer": find("compute-sanitizer")}


def plan(args: argparse.Namespace, gpu: Gpu, found: dict[str, str | None]) -> list[Phase]:
    """The phases with their jobs and budgets (scaled down if they exceed ``--total``)."""
    py = sys.executable
    budgets = dict(args.budgets)
    total = sum(budgets[p] for p in PHASES if p not in args.skip)
    if total > args.total:
        scale = args.total / total
        budgets = {k: v * scale for k, v in budgets.items()}
    phases = []

    build = Phase("build", budgets["build"])
    env = {"SMES_CUDA_ARCHS": gpu.arch, "MAX_JOBS": str(os.cpu_count() or 4)}
    build.jobs.append(
        Job(
            "build",
            [
                py,
                "-m",
                "pip",
                "install",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-e",
                REPO,
            ],  # fmt: skip
            env,
        )
    )
    if "build" in args.skip:
        build.skip = "--skip build: the installed extension is used as it is"
    elif found.get("nvcc") is None:
        build.skip = "nvcc not found (PATH, CUDA_HOME): the 'cuda' backend stays as installed"
    phases.append(build)

    tests = Phase("tests", budgets["tests"])
    pytest_args = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    gpu_tests = os.path.join(REPO, "tests/test_cuda_gpu.py")
    tests.jobs.append(Job("tests_gpu", [*pytest_args, gpu_tests]))
    tests.jobs.append(
        Job(
            "tests_triton",
            [*pytest_args, os.path.join(REPO, "tests/test_triton.py"), "-k", "not test_cuda_suite"],
            {"SMES_TRITON_DEVICE": "cuda"},
        )
    )
    if "tests" in args.skip:
        tests.skip = "--skip tests"
    phases.append(tests)

    san = Phase("sanitizer", budgets["sanitizer"])
    for b in GPU_BACKENDS:
        san.jobs.append(
            Job(
                f"sanitizer_{b}",
                [
                    found.get("compute-sanitizer") or "compute-sanitizer",
                    "--tool",
                    "memcheck",
                    "--error-exitcode",
                    "1",
                    "--leak-check",
                    "no",
                    py,
                    "-m",
                    "bench.gpu_check",
                    "--out",
                    args.out,
                    "--one-step",
                    b,
                ],  # fmt: skip
            )
        )
    if "sanitizer" in args.skip:
        san.skip = "--skip sanitizer"
    elif found.get("compute-sanitizer") is None:
        san.skip = "compute-sanitizer not found (PATH, CUDA_HOME)"
    phases.append(san)

    bench = Phase("bench", budgets["bench"])
    for dtype in DTYPES:
        for s in SETS:
            bench.jobs.append(
                Job(
                    f"bench_{dtype}_{s}",
                    [
                        py,
                        "-m",
                        "bench",
                        "--device",
                        "cuda",
                        "--dtype",
                        dtype,
                        "--sets",
                        s,
                        "--exponents",
                        *EXPONENTS,
                        "--backends",
                        *GPU_BACKENDS,
                        "--warmup",
                        "2",
                        "--repeats",
                        "5",
                        "--out",
                        os.path.join(args.out, f"bench_{dtype}_{s}"),
                    ],
                )  # fmt: skip
            )
    if "bench" in args.skip:
        bench.skip = "--skip bench"
    phases.append(bench)
    return phases


# ------------------------------------------------------------------------------ running


def run_job(job: Job, out: str, timeout: float) -> tuple[str, float, str]:
    """Run one job with its log in ``out``; (status, seconds, last line of its output)."""
    log = os.path.join(out, f"{job.name}.log")
    env = {**os.environ, **job.env}
    env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(job.argv)}\n# env: {job.env}\n")
        f.flush()
        try:
            proc = subprocess.Popen(
                job.argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            return "failed", 0.0, f"could not start: {e}"
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            _kill(proc)
            return "timeout", time.perf_counter() - t0, f"stopped after {timeout:.0f} s"
    seconds = time.perf_counter() - t0
    with open(log, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    last = lines[-1] if lines else ""
    return ("ok" if rc == 0 else "failed"), seconds, last[:160]


def _kill(proc: subprocess.Popen) -> None:
    """End the job's process group (the job and what it started), only that."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_phases(phases: list[Phase], out: str, total: float, runner=None) -> list[Result]:
    """Each phase within its budget and what is left of ``total``; a failed build skips the
    phases that need it. Bench jobs start only with MIN_BENCH_RUN seconds left."""
    runner = runner or run_job
    start = time.perf_counter()
    results = []
    build_failed = False
    for ph in phases:
        left = total - (time.perf_counter() - start)
        skip = ph.skip
        if skip is None and build_failed and ph.name != "bench":
            skip = "the build failed"
        if skip is None and left < 1:
            skip = "no time left"
        if skip is not None:
            results.append(Result(ph.name, "skipped", detail=skip))
            continue
        budget = min(ph.budget, left)
        t0 = time.perf_counter()
        res = Result(ph.name, "ok")
        details = []
        for job in ph.jobs:
            remaining = budget - (time.perf_counter() - t0)
            if remaining < (MIN_BENCH_RUN if ph.name == "bench" else 1):
                res.skipped_jobs.append(job.name)
                continue
            status, _, last = runner(job, out, remaining)
            if status != "ok":
                details.append(f"{job.name}: {status} ({last})")
                if res.status == "ok" or status == "timeout":
                    res.status = status
            elif ph.name == "tests":
                details.append(f"{job.name}: {last}")
        res.seconds = time.perf_counter() - t0
        if len(res.skipped_jobs) == len(ph.jobs):
            res.status, details = "skipped", ["no time left"]
        elif res.skipped_jobs:
            details.append(f"out of time for: {', '.join(res.skipped_jobs)}")
        res.detail = "; ".join(details)
        if ph.name == "build" and res.status != "ok":
            build_failed = True
        results.append(res)
    return results


# ------------------------------------------------------------------------------ the summary


def bench_rows(out: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "bench_*", "*.csv"))):
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def _f(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def bench_table(rows: list[dict]) -> list[str]:
    """One line per (dtype, set, p): SMES backends as × fused AdamW and % of the roofline."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        key = (r.get("param_dtype", "float32"), r["shape_set"], _f(r["exponent"]))
        cells.setdefault(key, {})[r["competitor"]] = r
    if not cells:
        return []
    lines = [
        "dtype    set         p      AdamW fused  SMES triton        SMES cuda          roof GB/s",
    ]
    for (dtype, s, p), c in cells.items():
        fused = c.get("AdamW fused", {})
        roof = next((v for k, v in c.items() if k.startswith("roofline")), {})
        parts = []
        for b in GPU_BACKENDS:
            r = c.get(f"SMES {b}")
            if r is None:
                parts.append(f"{'-':18}")
            else:
                x, pct = _f(r["speedup_vs_fused_adamw"]), _f(r["pct_of_roofline"])
                parts.append(f"{x:5.2f}x {pct:4.0f}% roof ")
        lines.append(
            f"{dtype:8} {s:11} {p:<6g} {_f(fused.get('ms_per_step')):8.3f} ms  "
            + " ".join(parts)
            + f" {_f(roof.get('gb_per_s')):8.0f}"
        )
    return lines


def summary(gpu: Gpu | None, results: list[Result], rows: list[dict], out: str) -> str:
    lines = []
    if gpu is not None:
        lines.append(f"GPU check on {gpu.name} (sm_{gpu.arch}, {gpu.count} GPU), output in {out}")
    for r in results:
        took = f"{r.seconds:5.0f} s" if r.status != "skipped" else "      "
        lines.append(f"  {r.phase:9} {r.status:8} {took}  {r.detail}"[:160])
    table = bench_table(rows)
    if table:
        lines.append("benchmark (x fused AdamW: > 1 is faster; % of the D2D-copy roofline):")
        room = SUMMARY_LINES - len(lines) - 1
        lines += table[: max(room, 2)]
        if len(table) > room:
            lines.append(f"  ... {len(table) - room} more lines in the CSVs")
    bad = [r.phase for r in results if r.status in ("failed", "timeout")]
    verdict = "FAILED in " + ", ".join(bad) if bad else "all phases that ran passed"
    lines.append("result: " + verdict)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ entry points


def gpu_info() -> Gpu | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return Gpu(
        torch.cuda.get_device_name(0),
        tuple(torch.cuda.get_device_capability(0)),
        torch.cuda.device_count(),
    )


def one_step(backend: str) -> int:
    """A small SMES step on the GPU, for compute-sanitizer: a few odd-sized tensors, two groups,
    grad_scale and found_inf, two steps."""
    import torch

    import smes_fused

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in (3, 1025, 4096, 0, 77)]
    opt = smes_fused.SMES(
        [dict(params=params[:2], exponent=-0.08), dict(params=params[2:], exponent=0.5)],
        backend=backend,
    )
    for found in (0.0, 1.0, 0.0):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step(
            grad_scale=torch.tensor(2.0, device="cuda"),
            found_inf=torch.tensor(found, device="cuda"),
        )
    torch.cuda.synchronize()
    print(f"one {backend} step: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one_step:
        return one_step(args.one_step)
    gpu = gpu_info()
    if gpu is None:
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False): "
              "nothing to check, every phase skipped")  # fmt: skip
        return 0
    os.makedirs(args.out, exist_ok=True)
    phases = plan(args, gpu, tools())
    print(f"gpu_check: {gpu.name}; phases " + ", ".join(
        f"{p.name} {p.budget:.0f} s" + (f" (skipped: {p.skip})" if p.skip else "") for p in phases
    ), flush=True)  # fmt: skip
    results = run_phases(phases, args.out, args.total)
    text = summary(gpu, results, bench_rows(args.out), args.out)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 1 if any(r.status in ("failed", "timeout") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
