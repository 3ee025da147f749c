"""python -m bench: SMES against torch.optim.AdamW(fused=True), on the device present.

For every shape set and exponent (a "cell"), each competitor is built on the same float32
parameters with random gradients (filled once; the optimizer step is timed alone, no
backward), takes one step (its state allocation, or compilation, is reported as the first-step
time), then all competitors of the cell are timed in interleaved rounds (A B C, C B A, ...)
after warm-up rounds. Reported are medians, and the median of the per-round ratios to fused
AdamW (speedup: > 1 is faster than fused AdamW).

Competitors: torch.optim.AdamW with fused=True (in every cell), foreach=True and the for-loop
(only in each set's first exponent cell: they are slow and do not depend on p), a torch.compile'd
AdamW step (--compile only, first cell only: compiling for thousands of tensors takes many
minutes on CPU),
every usable SMES backend of the device (not "reference"), and the roofline: on CPU a kernel
with the optimizer's memory pattern (smes_fused's roofline_ op when the compiled extension has
it, else torch foreach adds; float32 only, none for bf16 params), on GPU a device-to-device copy.

Bytes per parameter (for GB/s): 28 for float32 AdamW and SMES (read param, grad, m, v; write
param, m, v), 20 for SMES at p = 0 (v is not used), and what the roofline itself moves.
Writes bench_<device>.csv and bench_<device>.png (suffixed _quick or _full in those modes) into
--out: runs/bench/ by default, which git ignores; the committed results/ are regenerated only
on purpose, with --out results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import report
from .argtypes import (
    backend_name,
    distinct,
    finite_float,
    non_negative_int,
    out_dir,
    positive_float,
    positive_int,
)
from .argtypes import device as pick_device
from .competitors import smes_backends
from .env import environment
from .roofline import roofline
from .runner import Config, run
from .shapes import BUILDERS, FULL_PARAMS, QUICK_SETS, shape_set

COLUMNS_HELP = """\
columns (console; the CSV has these under longer names, plus device, versions and commit):
  ms/step      median time of one optimizer step
  Mparam/s     parameters updated per second
  B/param      bytes the step moves per parameter, used for GB/s
  GB/s         B/param x params / time
  %roof        GB/s as a percentage of the cell's roofline row
  x fused      median over rounds of (fused AdamW time / this time): > 1 is faster
  state MB     bytes of the optimizer state tensors (m, v, step) or the roofline's buffers
  peak MB      rise of peak memory while the competitor is built and takes its first step
               (CPU: process peak RSS; CUDA: torch.cuda.max_memory_allocated)
  1st step s   construction + first step: state allocation, and compile time with --compile
The CSV also has load_avg_1m, the 1-minute load average after each cell (this run's own
threads included): far above the thread count, other processes shared the cores.
"""
EXPONENTS = (0.5, 0.25, 0.0, -0.08, 0.37)
QUICK_EXPONENTS = (0.5, -0.08)


def _list(items) -> str:
    return ", ".join(map(str, items))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        epilog=COLUMNS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: tiny sets ({_list(QUICK_SETS)}), exponents {_list(QUICK_EXPONENTS)}, "
        "3 repeats (~20 s)",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="whole models (VGG-16 138M, GPT-2 124M, ViT-B/16 86M params, ...) instead of "
        "the default run's subsets; needs ~12 GB of memory and much longer",
    )
    p.add_argument(
        "--sets",
        nargs="+",
        choices=list(BUILDERS),
        metavar="SET",
        help=f"shape sets to run, from: {_list(BUILDERS)} (default: all; --quick: "
        f"{_list(QUICK_SETS)})",
    )
    p.add_argument(
        "--exponents",
        nargs="+",
        type=finite_float,
        metavar="P",
        help=f"SMES exponents (default: {_list(EXPONENTS)}; --quick: {_list(QUICK_EXPONENTS)})",
    )
    p.add_argument(
        "--repeats", type=positive_int, help="timed rounds per cell (default 10; --quick 3)"
    )
    p.add_argument(
        "--warmup", type=non_negative_int, help="untimed rounds per cell (default 3; --quick 1)"
    )
    p.add_argument(
        "--backends",
        nargs="+",
        type=backend_name,
        metavar="NAME",
        help="SMES backends (default: every one usable on the device, except reference)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="add a torch.compile'd AdamW step; its compile time is the 1st-step column",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="params and grads (bfloat16: every optimizer keeps bfloat16 state, as fused AdamW "
        "does; SMES gets state_dtype='param'); default float32",
    )
    p.add_argument(
        "--projection",
        action="store_true",
        help="SMES with projection=True (AdamP/SGDP, SPEC §4: two passes over tensors of dim > 1, "
        "40 B per float32 parameter instead of 28); fused AdamW stays the reference",
    )
    p.add_argument(
        "--state-dtype",
        choices=("param", "float32"),
        default="param",
        help="SMES's state dtype with --dtype bfloat16: the params' (default, as fused AdamW) or "
        "float32 (22 B per bf16 parameter instead of 14)",
    )
    p.add_argument(
        "--stochastic-rounding",
        action="store_true",
        help="with --dtype bfloat16: each SMES backend also runs with stochastic_rounding=True "
        "('SMES <backend> SR', same bytes per parameter), interleaved with its round-to-nearest "
        "step",
    )
    p.add_argument(
        "--clip",
        type=positive_float,
        metavar="MAX_NORM",
        help="clipped steps: every AdamW after clip_grad_norm_(MAX_NORM, foreach=True) (40 B "
        "per float32 parameter), SMES with max_grad_norm=MAX_NORM (32 B)",
    )
    p.add_argument(
        "--out",
        default=os.path.join("runs", "bench"),
        help="directory for the CSV and PNG (default: runs/bench/, git-ignored; the committed "
        "results/ were written with --out results, on purpose)",
    )
    args = p.parse_args(argv)
    if args.dtype != "bfloat16":
        if args.stochastic_rounding:
            p.error("--stochastic-rounding rounds bf16 params: it needs --dtype bfloat16")
        if args.state_dtype == "float32":
            p.error("--state-dtype float32 is for bf16 params: it needs --dtype bfloat16 "
                    "(float32 params have float32 state already)")  # fmt: skip
    args.device = pick_device(p, args.device)
    for flag in ("sets", "exponents", "backends"):
        distinct(p, f"--{flag}", getattr(args, flag))
    out_dir(p, args.out)
    return args


def config_from(args: argparse.Namespace, device: torch.device, backends: tuple) -> Config:
    scale = "quick" if args.quick else "full" if args.full else "default"
    names = args.sets or (QUICK_SETS if args.quick else tuple(BUILDERS))
    return Config(
        device=device,
        sets=tuple(shape_set(n, scale) for n in names),
        exponents=tuple(args.exponents or (QUICK_EXPONENTS if args.quick else EXPONENTS)),
        backends=backends,
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 3),
        repeats=args.repeats or (3 if args.quick else 10),
        compile=args.compile,
        dtype=getattr(torch, args.dtype),
        projection=args.projection,
        clip=args.clip,
        smes_state=torch.float32 if args.state_dtype == "float32" else None,
        stochastic_rounding=args.stochastic_rounding,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    env = environment(device)
    considered = smes_backends(device, args.backends)
    backends = tuple(b for b, why in considered.items() if why is None)
    config = config_from(args, device, backends)

    print(
        f"device: {env['device_name']} ({device.type}), {env['threads']} threads, "
        f"torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}"
    )
    if device.type == "cpu":
        print(
            f"CPU kernel sets: SMES {env['smes_cpu_isa']} (SMES_CPU_ISA caps it), torch "
            f"{env['torch_cpu_capability']} (ATEN_CPU_CAPABILITY caps it)"
        )
    busy = env["load_avg_start"] > 0.25 * (os.cpu_count() or 1)
    if device.type == "cpu" and busy:
        print(
            f"warning: load average {env['load_avg_start']} on {os.cpu_count()} CPUs before the "
            "run: other processes compete for the cores and the timings will be noisy"
        )
    if config.clip is not None:
        print(
            f"clipped steps, max norm {config.clip:g}: AdamW after clip_grad_norm_(foreach=True) "
            "(40 B per float32 parameter), SMES with max_grad_norm (32; the B/param column "
            "gives this run's)"
        )
    if config.stochastic_rounding:
        print("stochastic rounding: 'SMES <backend> SR' is each backend with "
              "stochastic_rounding=True, beside its round-to-nearest step")  # fmt: skip
    if config.projection:
        print("SMES with projection=True (AdamP/SGDP): 40 B per float32 parameter in tensors of "
              "dim > 1 (28 at p = 0; the B/param column gives this run's)")  # fmt: skip
    for b, why in considered.items():
        if why is not None:
            print(f"SMES {b}: not benchmarked: {why}")
    roof = roofline(device, config.dtype)
    roof_text = f"{roof[0]} ({roof[1]} B/param)" if roof else "no roofline for 16-bit params on CPU"
    print(f"SMES backends: {', '.join(backends) or 'none'}; {roof_text}")
    for s in config.sets:
        full = f", whole model {FULL_PARAMS[s.name] / 1e6:.1f}M" if s.name in FULL_PARAMS else ""
        print(f"  {s.name}: {s.n_params / 1e6:.2f}M params, {s.n_tensors} tensors{full}")

    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(total=config.rounds, unit="round", file=sys.stderr) as bar:
        rows = run(
            config, on_round=lambda: bar.update(1), on_cell=bar.set_description, on_skip=bar.write
        )
    elapsed = time.perf_counter() - t0
    rows = [{**env, **r} for r in rows]

    print(report.table(rows))
    suffix = "_quick" if args.quick else "_full" if args.full else ""
    if config.dtype != torch.float32:
        suffix += f"_{args.dtype}"
    if config.smes_state is not None and config.smes_state != config.dtype:
        suffix += "_f32state"
    suffix += "_sr" if config.stochastic_rounding else ""
    suffix += "_projection" if config.projection else ""
    suffix += "_clip" if config.clip is not None else ""
    stem = os.path.join(args.out, f"bench_{device.type}{suffix}")
    report.write_csv(rows, stem + ".csv")
    if rows:
        report.plot(rows, stem + ".png")
    print(f"\n{len(rows)} rows in {elapsed:.0f} s; wrote {stem}.csv and {stem}.png")
    return 0
