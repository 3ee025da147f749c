"""Command line of ``python -m smes_fused.sweep``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from dataclasses import replace

from .data import DataError, load_data, subset
from .output import plot_accuracy, plot_layers, plot_title, read_csv, summary_table, write_csv
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
    ap.add_argument("--data", default="digits", help="digits | cifar10:DIR | cifar100:DIR")
    ap.add_argument("--exponents", type=_floats, default=d.exponents, help="p grid (comma list)")
    ap.add_argument("--seeds", type=_ints, default=d.seeds, help="seeds (comma list)")
    ap.add_argument(
        "--lr-mults", type=_floats, default=d.lr_mults, help="lr grid: multiples of lr_c(p)"
    )
    ap.add_argument("--lr0", type=float, default=d.lr0, help="lr_c at p = 0 (SGD scale)")
    ap.add_argument("--lr-half", type=float, default=d.lr_half, help="lr_c at p = 0.5 (Adam)")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 (coupled)")
    ap.add_argument("--schedule", choices=("cosine", "step"), default=d.schedule)
    ap.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    ap.add_argument("--no-batchnorm", action="store_true", help="plain VGG, no BatchNorm")
    ap.add_argument("--train-subset", type=int, default=None, help="use N training images")
    ap.add_argument("--backend", default=d.backend, help="SMES backend (default auto)")
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
    ap.add_argument("--tag", default="sweep", help="output file prefix (default sweep)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--replot",
        action="store_true",
        help="train nothing: redraw the table and PNGs from an existing <out>/<tag>.csv",
    )
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: p in {0, 0.5}, 1 seed, 1 epoch, 256 images, no lr grid, 1 job",
    )
    return ap


def replot(stem: str) -> int:
    if not os.path.isfile(stem + ".csv"):
        print(f"error: --replot needs {stem}.csv (run the sweep first)", file=sys.stderr)
        return 2
    rows = read_csv(stem + ".csv")
    runs = read_csv(stem + "_runs.csv") if os.path.isfile(stem + "_runs.csv") else None
    title = plot_title(rows)
    plot_accuracy(rows, stem + "_accuracy.png", title)
    plot_layers(rows, stem + "_layers.png", title)
    print(summary_table(rows, runs))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = Config(
        exponents=args.exponents,
        seeds=args.seeds,
        lr_mults=args.lr_mults,
        lr0=args.lr0,
        lr_half=args.lr_half,
        epochs=args.epochs,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        batchnorm=not args.no_batchnorm,
        backend=args.backend,
    )
    jobs, n_train = args.jobs, args.train_subset
    if args.quick:
        cfg = replace(cfg, exponents=(0.0, 0.5), seeds=(0,), lr_mults=(1.0,), epochs=1)
        jobs, n_train = 1, n_train or 256
    if not cfg.exponents or not cfg.seeds or not cfg.lr_mults or cfg.epochs < 1:
        print("error: empty grid (exponents, seeds, lr-mults) or epochs < 1", file=sys.stderr)
        return 2

    stem = os.path.join(args.out, args.tag)
    if args.replot:
        return replot(stem)
    try:
        data = subset(load_data(args.data), n_train)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    n_runs = len(cfg.exponents) * len(cfg.lr_mults) * len(cfg.seeds)
    print(
        f"{data.name}: {len(data.y_train)} train / {len(data.y_val)} val / "
        f"{len(data.y_test)} test, {data.n_classes} classes; {n_runs} runs "
        f"({len(cfg.exponents)} p x {len(cfg.lr_mults)} lr x {len(cfg.seeds)} seeds), "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, {jobs} job(s)"
    )
    t0 = time.perf_counter()
    runs, epochs = run_grid(data, cfg, jobs, progress=not args.no_progress)
    chosen = select_lr(runs)
    rows = [r for r in runs if r["lr"] == chosen[r["p"]]]
    wall = time.perf_counter() - t0

    write_csv(stem + ".csv", rows)
    write_csv(stem + "_runs.csv", runs)
    write_csv(stem + "_epochs.csv", epochs)
    title = plot_title(rows)
    if not args.no_plots:
        plot_accuracy(rows, stem + "_accuracy.png", title)
        plot_layers(rows, stem + "_layers.png", title)
    print(summary_table(rows, runs))
    print(f"wall time {wall:.1f} s ({n_runs} runs); wrote {stem}.csv, {stem}_runs.csv, ", end="")
    print(f"{stem}_epochs.csv" + ("" if args.no_plots else f", {stem}_accuracy/_layers.png"))
    return 0
