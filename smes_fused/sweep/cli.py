"""Command line of ``python -m smes_fused.sweep``."""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import os
import sys
import time
from dataclasses import replace

from .data import DataError, data_kind, load_data
from .model import INITS, MODELS
from .output import (
    csv_problem,
    paired_rows,
    paired_table,
    plot_all,
    read_csv,
    summary_table,
    write_csv,
)
from .parallel import run_grid
from .training import Config, select_lr


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from e


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e


# Per --data defaults, between Config's and the command line's: what each task needs to show
# anything in 15 minutes on 2 cores. --paper-constants goes on top; explicit options win.
WILSON_EXPONENTS = tuple(round(-0.3 + 0.05 * i, 2) for i in range(17))  # -0.3, -0.25, ..., 0.5
TASK_DEFAULTS: dict[str, dict] = {
    "mnist5k": {"train_size": 1000, "epochs": 10, "lr_mults": (0.25, 1.0, 4.0)},
    "wilson": {
        "exponents": WILSON_EXPONENTS,
        "train_size": 100,
        "epochs": 1000,  # full-batch steps (the loss is below 1e-12 after 300)
        "batch_size": 0,
        "weight_decay": 0.0,
        "warmup_epochs": 0.0,
        "lr0": 0.3,
        "lr_half": 0.03,
        "log_every": 100,
    },
}
PAPER_CONSTANTS = {"batch_size": 128, "lr": 0.1, "lr_mults": (1.0,), "weight_decay": 5e-4}
_OVERRIDABLE = (
    "exponents",
    "lr_mults",
    "lr0",
    "lr_half",
    "lr",
    "epochs",
    "batch_size",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "log_every",
)


def build_parser() -> argparse.ArgumentParser:
    # the package docstring is the manual: --help prints it
    doc = importlib.import_module(__package__).__doc__.split("\n\n", 1)
    ap = argparse.ArgumentParser(
        prog="python -m smes_fused.sweep",
        description=doc[0],
        epilog=doc[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Config()
    w = TASK_DEFAULTS["wilson"]
    ap.add_argument(
        "--data",
        default="digits",
        help="digits | mnist5k | wilson | cifar10:DIR | cifar100:DIR (default digits)",
    )
    ap.add_argument(
        "--model",
        choices=MODELS,
        default="vgg",
        help="vgg (default) or mlp; wilson always uses its linear model",
    )
    ap.add_argument(
        "--init",
        choices=INITS,
        default=None,
        help="weight init: torch's default or He's (default: torch with BatchNorm, he without)",
    )
    ap.add_argument("--mlp-depth", type=int, default=d.mlp_depth, help="weight layers of the MLP")
    ap.add_argument("--mlp-width", type=int, default=d.mlp_width, help="hidden units of the MLP")
    ap.add_argument(
        "--exponents",
        type=_floats,
        default=None,
        help="p grid (comma list; default -0.3,-0.2,-0.1,-0.08,0,0.1,0.25,0.5, "
        "wilson: -0.3 to 0.5 in steps of 0.05)",
    )
    ap.add_argument(
        "--seeds",
        type=_ints,
        default=d.seeds,
        help="seeds (comma list, default 0,1,2); for wilson each seed is a data draw",
    )
    ap.add_argument(
        "--lr-mults",
        type=_floats,
        default=None,
        help="lr grid: multiples of lr_c(p) (default 0.25,0.5,1,2,4; mnist5k 0.25,1,4)",
    )
    ap.add_argument(
        "--lr0",
        type=float,
        default=None,
        help=f"lr_c at p = 0 (SGD scale; default {d.lr0}, wilson {w['lr0']})",
    )
    ap.add_argument(
        "--lr-half",
        type=float,
        default=None,
        help=f"lr_c at p = 0.5 (Adam; default {d.lr_half}, wilson {w['lr_half']})",
    )
    ap.add_argument(
        "--lr", type=float, default=None, help="one lr_c for every p instead of the interpolation"
    )
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"default {d.epochs}; mnist5k 10; wilson {w['epochs']} (full-batch steps)",
    )
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"default {d.batch_size}; 0 = full batch (wilson's default)",
    )
    ap.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help=f"L2, coupled (default {d.weight_decay}; wilson 0)",
    )
    ap.add_argument("--schedule", choices=("cosine", "step"), default=None)
    ap.add_argument(
        "--warmup-epochs",
        type=float,
        default=None,
        help=f"default {d.warmup_epochs} (wilson 0: one step)",
    )
    ap.add_argument(
        "--paper-constants",
        action="store_true",
        help="the paper's batch 128, lr 0.1 for every p (no lr grid), weight decay "
        "5e-4; options given explicitly still win",
    )
    ap.add_argument("--no-batchnorm", action="store_true", help="no BatchNorm (VGG or MLP)")
    ap.add_argument(
        "--train-size",
        "--train-subset",
        dest="train_size",
        type=int,
        default=None,
        help="training images to use (mnist5k default 1000 of its 4000; digits, "
        "CIFAR: all); wilson: training examples to generate (default 100)",
    )
    ap.add_argument("--wilson-val", type=int, default=100, help="wilson: validation examples")
    ap.add_argument("--wilson-test", type=int, default=500, help="wilson: test examples")
    ap.add_argument(
        "--wilson-positive",
        type=float,
        default=0.7,
        help="wilson: probability of the label +1 (> 0.5 in the paper)",
    )
    ap.add_argument(
        "--log-every",
        type=int,
        default=None,
        help="epochs per row of <tag>_epochs.csv (default 1, wilson 100)",
    )
    ap.add_argument("--backend", default=d.backend, help="SMES backend (default auto)")
    ap.add_argument(
        "--projection", action="store_true", help="AdamP/SGDP's projection in every run (SPEC §4)"
    )
    ap.add_argument(
        "--rectify", action="store_true", help="RAdam's rectification in every run (SPEC §4)"
    )
    ap.add_argument(
        "--exponent-schedule",
        choices=("linear", "cosine", "cyclic"),
        default=None,
        help="p moves from --exponent-start to each run's p over training (linear, cosine), or "
        "cycles between them with a period of 1/4 of training (cyclic)",
    )
    ap.add_argument(
        "--exponent-start",
        type=float,
        default=d.exponent_start,
        help="the schedule's starting exponent (default 0.5, Adam)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="parallel worker processes (default min(2, cores)); 1 runs in-process",
    )
    ap.add_argument(
        "--out",
        default=os.path.join("runs", "sweep"),
        help="output folder (default runs/sweep/, git-ignored; the committed figures were made "
        "with --out results)",
    )
    ap.add_argument(
        "--tag",
        default=None,
        help="output file prefix (default sweep; wilson: sweep_wilson_n<train size>; mnist5k: "
        "sweep_mnist5k_<model>[-bn]_n<train size>; _paper appended with "
        "--paper-constants)",
    )
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--replot",
        action="store_true",
        help="train nothing: redo the tables, <tag>_paired.csv and the PNGs from an existing "
        "<out>/<tag>.csv",
    )
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: p in {0, 0.5}, 1 seed, no lr grid, 1 job, 1 epoch on 256 images "
        "(wilson: 200 steps)",
    )
    return ap


def resolve(args: argparse.Namespace) -> tuple[Config, int | None, int, str]:
    """(config, train size, jobs, tag) from the layers of defaults and the command line."""
    kind = data_kind(args.data)
    values: dict = {}
    values.update(TASK_DEFAULTS.get(kind, {}))
    if args.paper_constants:
        values.update(PAPER_CONSTANTS)
    values.update(
        {k: getattr(args, k) for k in (*_OVERRIDABLE, "train_size") if getattr(args, k) is not None}
    )
    train_size = values.pop("train_size", None)
    cfg = Config(
        seeds=args.seeds,
        batchnorm=not args.no_batchnorm,
        backend=args.backend,
        model=args.model,
        init=args.init,
        mlp_depth=args.mlp_depth,
        mlp_width=args.mlp_width,
        projection=args.projection,
        rectify=args.rectify,
        exponent_schedule=args.exponent_schedule,
        exponent_start=args.exponent_start,
        **values,
    )
    jobs = args.jobs
    if args.quick:
        quick_epochs = 200 if kind == "wilson" else 1
        cfg = replace(cfg, exponents=(0.0, 0.5), seeds=(0,), lr_mults=(1.0,), epochs=quick_epochs)
        jobs = 1
        if kind != "wilson":
            train_size = args.train_size or 256
    tag = args.tag
    if tag is None:
        if kind == "wilson":
            tag = f"sweep_wilson_n{train_size}"
        elif kind == "mnist5k":
            bn = "-bn" if cfg.batchnorm else ""
            tag = f"sweep_mnist5k_{cfg.model}{bn}_n{train_size}"
        else:
            tag = "sweep"
        if args.paper_constants:
            tag += "_paper"
        tag += settings_tag(cfg)
    return cfg, train_size, jobs, tag


def settings_tag(cfg) -> str:
    """The SPEC §4 settings in a file name ("" for plain SMES)."""
    out = "_projection" if cfg.projection else ""
    out += "_rectify" if cfg.rectify else ""
    if cfg.exponent_schedule:
        out += f"_{cfg.exponent_schedule}-from-{cfg.exponent_start:g}"
    return out


def settings_line(cfg) -> str:
    """What every run of the table used, beyond p and lr."""
    sched = (
        f"{cfg.exponent_schedule} from p = {cfg.exponent_start:g} to each row's p"
        if cfg.exponent_schedule
        else "none (constant p)"
    )
    return (
        f"SMES settings: projection={cfg.projection}, rectify={cfg.rectify}, "
        f"exponent schedule: {sched}"
    )


def replot(stem: str) -> int:
    if not os.path.isfile(stem + ".csv"):
        print(f"error: --replot needs {stem}.csv (run the sweep first)", file=sys.stderr)
        return 2
    try:
        rows = read_csv(stem + ".csv")
    except (UnicodeDecodeError, csv.Error) as e:
        print(f"error: {stem}.csv is not a CSV file ({e})", file=sys.stderr)
        return 2
    bad = csv_problem(rows, stem + ".csv")
    if bad is not None:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    runs = read_csv(stem + "_runs.csv") if os.path.isfile(stem + "_runs.csv") else None
    write_csv(stem + "_paired.csv", paired_rows(rows))
    plot_all(rows, stem)
    print(summary_table(rows, runs))
    print()
    print(paired_table(rows))
    return 0


def _load(args: argparse.Namespace, train_size: int | None, seeds: tuple[int, ...]):
    """One data set, or for wilson one draw per seed."""
    opts = dict(
        wilson_val=args.wilson_val,
        wilson_test=args.wilson_test,
        wilson_positive=args.wilson_positive,
    )
    if data_kind(args.data) == "wilson":
        return {s: load_data(args.data, train_size, seed=s, **opts) for s in seeds}
    return load_data(args.data, train_size, **opts)


def problem(cfg: Config, train_size: int | None) -> str | None:
    """What is wrong with the grid, the settings and the requested train size before any run
    starts, or None (bad values surfaced as tracebacks from the training code, or from the pool
    of worker processes; a train size of 0 took every image, -5 all but 5)."""
    if not cfg.exponents or not cfg.seeds or not cfg.lr_mults or cfg.epochs < 1:
        return "empty grid (exponents, seeds, lr-mults) or epochs < 1"
    if cfg.log_every < 1:
        return "--log-every must be >= 1"
    grids = (("exponents", cfg.exponents), ("seeds", cfg.seeds), ("lr-mults", cfg.lr_mults))
    for name, values in grids:
        if len(set(values)) != len(values):
            return f"--{name} has repeated values: {values}"
    if not all(math.isfinite(p) for p in (*cfg.exponents, cfg.exponent_start)):
        return f"exponents must be finite: {cfg.exponents}"
    lrs = {"lr-mults": cfg.lr_mults, "lr0": (cfg.lr0,), "lr-half": (cfg.lr_half,)}
    if cfg.lr is not None:
        lrs["lr"] = (cfg.lr,)
    for name, values in lrs.items():
        if not all(0 < v < math.inf for v in values):
            return f"--{name} must be > 0 and finite: {values}"
    if not 0 <= cfg.weight_decay < math.inf:
        return f"--weight-decay must be >= 0 and finite: {cfg.weight_decay}"
    if train_size is not None and train_size < 1:
        return f"--train-size must be >= 1, got {train_size}"
    if cfg.batch_size < 0:
        return f"--batch-size must be >= 0 (0: full batch), got {cfg.batch_size}"
    if not 0 <= cfg.warmup_epochs < math.inf:
        return f"--warmup-epochs must be >= 0 and finite, got {cfg.warmup_epochs}"
    if cfg.model == "mlp" and (cfg.mlp_depth < 2 or cfg.mlp_width < 1):
        return (
            f"an MLP needs --mlp-depth >= 2 and --mlp-width >= 1, got {cfg.mlp_depth}, "
            f"{cfg.mlp_width}"
        )
    from ..backends import NAMES

    if cfg.backend not in ("auto", *NAMES):
        return f"unknown --backend {cfg.backend!r}; expected one of {', '.join(('auto', *NAMES))}"
    return None


def out_problem(out: str, tag: str, jobs: int) -> str | None:
    """What is wrong with where the results go and the job count, or None (checked before the
    data is loaded: a folder under a file, or a tag with a folder in it, failed after training)."""
    if jobs < 1:
        return f"--jobs must be >= 1, got {jobs}"
    if not tag or os.sep in tag or tag in (".", ".."):
        return f"--tag must be a plain name without {os.sep!r}, got {tag!r}"
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out}: exists and is not a folder"
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        return f"--out {out}: cannot make the folder ({e.strerror})"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, train_size, jobs, tag = resolve(args)
    why = problem(cfg, args.train_size) or (
        None if args.replot else out_problem(args.out, tag, args.jobs)
    )
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2

    stem = os.path.join(args.out, tag)
    if args.replot:
        return replot(stem)
    try:
        data = _load(args, train_size, cfg.seeds)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    n_runs = len(cfg.exponents) * len(cfg.lr_mults) * len(cfg.seeds)
    one = next(iter(data.values())) if isinstance(data, dict) else data
    n = len(one.y_train)
    what = (
        f"{one.x_train.shape[1]} features, one draw per seed"
        if isinstance(data, dict)
        else f"{one.n_classes} classes"
    )
    batch = n if cfg.batch_size <= 0 else min(cfg.batch_size, n)
    lr = f"lr {cfg.lr:g}" if cfg.lr is not None else f"lr_c {cfg.lr0:g} → {cfg.lr_half:g}"
    print(
        f"{one.name}: {n} train / {len(one.y_val)} val / {len(one.y_test)} test, {what}; "
        f"{n_runs} runs ({len(cfg.exponents)} p x {len(cfg.lr_mults)} lr x "
        f"{len(cfg.seeds)} seeds), {cfg.epochs} epochs, batch {batch}, {lr}, weight decay "
        f"{cfg.weight_decay:g}, {jobs} job(s)"
    )
    t0 = time.perf_counter()
    runs, epochs = run_grid(data, cfg, jobs, progress=not args.no_progress)
    chosen = select_lr(runs)
    rows = [r for r in runs if r["lr"] == chosen[r["p"]]]
    wall = time.perf_counter() - t0

    written = [
        path
        for path, rs in (
            (".csv", rows),
            ("_runs.csv", runs),
            ("_epochs.csv", epochs),
            ("_paired.csv", paired_rows(rows)),
        )
        if write_csv(stem + path, rs)
    ]
    if not args.no_plots:
        plot_all(rows, stem)
        written += ["_accuracy.png", "_layers.png"]
    print(settings_line(cfg))
    print(summary_table(rows, runs))
    print()
    print(paired_table(rows))
    print(f"wall time {wall:.1f} s ({n_runs} runs); wrote " + ", ".join(stem + w for w in written))
    return 0
