"""python -m bench.in_backward: peak memory of a training step, usual step against SMES in backward.

One training step (forward, backward, optimizer step) of a model, measured from its start,
where the parameters, the optimizer state (allocated by two warm-up steps) and the batch are
live and no gradient is: with the usual ``loss.backward(); opt.step(); opt.zero_grad()``, and
with ``smes_fused.in_backward.attach`` (each bucket of parameters stepped, and its gradients
freed, as soon as backward finishes them) at each ``--bucket-mb``.

Memory. On CUDA, ``torch.cuda.max_memory_allocated`` over the step. On CPU, the allocations and
frees the CPU allocator reports to torch's profiler (``profile_memory=True``), summed in time
order: the peak of that running sum is the step's rise above its start (everything torch
allocates, the autograd engine's and the kernels' buffers included). ``peak MB`` adds the bytes
live at the start (params + state + batch), so the columns read as the step's footprint.
Time: median ms per step over ``--steps`` interleaved rounds (usual, in-backward, ...), without
the profiler.

Models: ``mlp`` (``--depth`` Linear+GELU layers of ``--width``) and ``transformer`` (an input
projection, ``--layers`` pre-norm ``nn.TransformerEncoderLayer`` blocks of width ``--d-model``,
the block of bench/shapes.py, and a head), random float32 data, an MSE loss.

    python -m bench.in_backward                       # CSV to runs/in_backward/
    python -m bench.in_backward --out results         # the committed results/, on purpose

Writes ``in_backward_<device>[_<suffix>].csv`` into ``--out``. The committed results were made
with ``--out results`` and with ``--models transformer --batch 2 --suffix batch2 --out results``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import statistics
import sys
import time

import torch
from torch import nn

import smes_fused
from smes_fused.backends import BucketKey, resolve
from smes_fused.in_backward import attach

from .argtypes import (
    backend_name,
    file_part,
    finite_float,
    non_negative_float,
    out_dir,
    positive_int,
)
from .argtypes import device as pick_device
from .env import environment
from .shapes import _block

COLUMNS = (
    "date", "device", "device_name", "threads", "load_avg_start", "torch", "smes_fused",
    "git_commit", "command",
    "model", "n_params", "n_tensors", "batch", "backend", "exponent", "mode", "bucket_bytes",
    "n_buckets", "param_bytes", "state_bytes", "grad_bytes", "start_bytes", "rise_bytes",
    "peak_bytes", "saved_vs_usual_bytes", "ms_per_step",
)  # fmt: skip


def build(name: str, args) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model, its input and its target (seeded: every mode gets the same)."""
    torch.manual_seed(0)
    if name == "mlp":
        layers: list[nn.Module] = []
        for _ in range(args.depth):
            layers += [nn.Linear(args.width, args.width), nn.GELU()]
        model = nn.Sequential(*layers, nn.Linear(args.width, args.width))
        x = torch.randn(args.batch, args.width)
        return model, x, torch.randn(args.batch, args.width)
    if name == "transformer":
        d = args.d_model
        model = nn.Sequential(
            nn.Linear(d, d),
            *[_block(d, max(1, d // 64), 4 * d) for _ in range(args.layers)],
            nn.LayerNorm(d),
            nn.Linear(d, d),
        )
        model.train()
        x = torch.randn(args.batch, args.seq, d)
        return model, x, torch.randn(args.batch, args.seq, d)
    raise SystemExit(f"unknown model {name!r}: mlp or transformer")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


class Run:
    """One model with one optimizer mode, ready to step."""

    def __init__(self, name: str, mode: str, bucket_bytes: int | None, args, device) -> None:
        self.model, x, y = build(name, args)
        self.model.to(device)
        self.x, self.y = x.to(device), y.to(device)
        kw = dict(lr=args.lr, exponent=args.exponent, backend=args.backend)
        if mode == "usual":
            self.opt = smes_fused.SMES(self.model.parameters(), **kw)
        else:
            self.opt = attach(self.model, bucket_size_bytes=bucket_bytes, **kw)
        self.name, self.mode, self.bucket_bytes = name, mode, bucket_bytes
        for _ in range(2):  # state allocated, plans built
            self.step()

    def step(self) -> None:
        loss = nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def live_bytes(self) -> dict[str, int]:
        params = list(self.model.parameters())
        state = [t for s in self.opt.state.values() for t in s.values()]
        return {
            "param_bytes": _nbytes(params),
            "state_bytes": _nbytes(state),
            "grad_bytes": _nbytes(params),  # what a usual step holds at the end of backward
            "start_bytes": _nbytes(params) + _nbytes(state) + _nbytes([self.x, self.y]),
        }


def rise_during(fn, device: torch.device) -> int:
    """Peak bytes allocated above the start while ``fn()`` runs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.in_backward",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("--models", nargs="+", choices=("mlp", "transformer"),
                    default=["mlp", "transformer"])  # fmt: skip
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--backend", type=backend_name, default="auto",
                    help="SMES backend (default: auto)")  # fmt: skip
    ap.add_argument("--exponent", type=finite_float, default=-0.08)
    ap.add_argument("--lr", type=non_negative_float, default=1e-3)
    ap.add_argument("--bucket-mb", type=non_negative_float, nargs="+", default=[0.0, 4.0, 25.0],
                    help="in-backward bucket sizes, MiB (0: one parameter per bucket)")  # fmt: skip
    ap.add_argument("--width", type=positive_int, default=1024, help="mlp width")
    ap.add_argument("--depth", type=positive_int, default=6, help="mlp hidden layers")
    ap.add_argument("--d-model", type=positive_int, default=384, help="transformer width")
    ap.add_argument("--layers", type=positive_int, default=4, help="transformer blocks")
    ap.add_argument("--seq", type=positive_int, default=32, help="transformer sequence length")
    ap.add_argument("--batch", type=positive_int, default=8,
                    help="mlp batch; transformer: sequences")  # fmt: skip
    ap.add_argument("--steps", type=positive_int, default=5, help="timed rounds")
    ap.add_argument("--out", default=os.path.join("runs", "in_backward"),
                    help="directory for the CSV (default runs/in_backward/, git-ignored; "
                    "--out results for the committed one)")  # fmt: skip
    ap.add_argument("--suffix", type=file_part, help="appended to the CSV name: in_backward_cpu_X")
    args = ap.parse_args(argv)
    device = pick_device(ap, args.device)
    args.device = device.type
    # the backend that runs the models' float32 params: "auto" is recorded as what it resolves to
    try:
        args.backend = resolve(args.backend, BucketKey(device, torch.float32, torch.float32)).name
    except RuntimeError as e:
        ap.error(f"--backend: {e}")
    out_dir(ap, args.out)
    env = environment(device)
    env["command"] = " ".join(["python -m bench.in_backward", *(argv or sys.argv[1:])])

    rows = []
    for name in args.models:
        runs = [Run(name, "usual", None, args, device)]
        for mb in args.bucket_mb:
            runs.append(Run(name, "in_backward", int(mb * 2**20), args, device))
        times: dict[int, list[float]] = {i: [] for i in range(len(runs))}
        for r in range(args.steps):  # interleaved: A B C, C B A, ...
            order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
            for i in order:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                runs[i].step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[i].append(time.perf_counter() - t)
        usual_peak = None
        for i, run in enumerate(runs):
            live = run.live_bytes()
            rise = rise_during(run.step, device)
            peak = live["start_bytes"] + rise
            usual_peak = peak if usual_peak is None else usual_peak
            params = list(run.model.parameters())
            rows.append(
                {
                    **env,
                    "model": name,
                    "n_params": sum(p.numel() for p in params),
                    "n_tensors": len(params),
                    "batch": args.batch,
                    "backend": args.backend,
                    "exponent": args.exponent,
                    "mode": run.mode,
                    "bucket_bytes": "" if run.bucket_bytes is None else run.bucket_bytes,
                    "n_buckets": len(getattr(run.opt, "_buckets", ())) or "",
                    **live,
                    "rise_bytes": rise,
                    "peak_bytes": peak,
                    "saved_vs_usual_bytes": usual_peak - peak,
                    "ms_per_step": round(statistics.median(times[i]) * 1e3, 3),
                }
            )

    mb = 2**20
    print(
        f"{env['device_name']}, torch {env['torch']}, {env['threads']} threads, "
        f"SMES backend {args.backend}, p = {args.exponent:g}; memory from the step's start "
        f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'profiler'}), "
        f"median of {args.steps} interleaved steps"
    )
    head = (
        f"{'model':<12} {'params':>8} {'mode':<22} {'buckets':>7} {'start MB':>9} "
        f"{'grads MB':>9} {'rise MB':>8} {'peak MB':>8} {'saved MB':>9} {'ms/step':>8}"
    )
    print(head)
    for r in rows:
        mode = "usual" if r["mode"] == "usual" else f"in-backward {r['bucket_bytes'] / mb:g} MiB"
        print(
            f"{r['model']:<12} {r['n_params'] / 1e6:>7.2f}M {mode:<22} {str(r['n_buckets']):>7} "
            f"{r['start_bytes'] / mb:>9.1f} {r['grad_bytes'] / mb:>9.1f} "
            f"{r['rise_bytes'] / mb:>8.1f} {r['peak_bytes'] / mb:>8.1f} "
            f"{r['saved_vs_usual_bytes'] / mb:>9.1f} {r['ms_per_step']:>8.2f}"
        )
    os.makedirs(args.out, exist_ok=True)
    suffix = f"_{args.suffix}" if args.suffix else ""
    path = os.path.join(args.out, f"in_backward_{device.type}{suffix}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
