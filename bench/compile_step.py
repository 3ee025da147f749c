"""python -m bench.compile_step: a torch.compile'd training step with SMES against AdamW.

The same small MLP training step (forward, backward, ``opt.step()``), compiled with
``torch.compile``, with a ``LambdaLR`` scheduler that sets a new float lr every step (the case
that used to recompile SMES's step on every step). For each optimizer it reports the number of
graphs dynamo made over ``--steps`` steps, the time of those first steps (compilation included),
and the median time of a compiled step afterwards, timed in interleaved rounds (A B C, C B A, ...)
so that machine noise favours no one.

    python -m bench.compile_step                 # AdamW (foreach, fused) vs SMES (cpu, foreach)
    python -m bench.compile_step --width 1024 --rounds 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from torch._dynamo.utils import counters

import smes_fused


def _competitors(exponent: float) -> dict:
    ok = smes_fused.available_backends()
    out = {
        "AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    }
    for name in ("cpu", "foreach"):
        if ok.get(name) is None:
            out[f"SMES {name} (p={exponent:g})"] = lambda ps, name=name: smes_fused.SMES(
                ps, lr=smes_fused.lr_for_exponent(exponent), exponent=exponent, backend=name
            )
    return out


def _setup(width: int, make, exponent: float):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width),
        torch.nn.GELU(), torch.nn.Linear(width, 16),
    )  # fmt: skip
    x, y = torch.randn(64, width), torch.randn(64, 16)
    opt = make(list(model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))

    def train_step():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return torch.compile(train_step), sched


def _first_steps(args, name: str) -> tuple[int, float]:
    """Graphs dynamo makes over the first ``--steps`` steps, and their time, in a fresh process
    (a process that compiled other optimizers already would share their graphs and caches)."""
    step, sched = _setup(args.width, _competitors(args.exponent)[name], args.exponent)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
        sched.step()
    return counters["stats"]["unique_graphs"], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=512, help="hidden width of the MLP")
    ap.add_argument("--steps", type=int, default=12, help="steps counted for graphs and compile")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds after compilation")
    ap.add_argument("--exponent", type=float, default=-0.08)
    ap.add_argument("--first-steps-of", help=argparse.SUPPRESS)  # the fresh-process part
    args = ap.parse_args(argv)
    if args.first_steps_of:
        print("RESULT", json.dumps(_first_steps(args, args.first_steps_of)))
        return 0

    runs = {}
    for name, make in _competitors(args.exponent).items():
        cmd = [sys.executable, "-m", "bench.compile_step", *(argv or sys.argv[1:])]
        r = subprocess.run([*cmd, "--first-steps-of", name], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name}: the fresh-process compile failed:\n{r.stderr[-2000:]}")
        graphs, first = json.loads(r.stdout.split("RESULT", 1)[1])
        step, sched = _setup(args.width, make, args.exponent)
        for _ in range(args.steps):  # compile here too (no dynamo reset: all steps stay live)
            step()
            sched.step()
        runs[name] = dict(step=step, sched=sched, graphs=graphs, first=first, times=[])
        print(f"compiled {name}: {graphs} graphs in {args.steps} steps, {first:.1f} s", flush=True)

    names = list(runs)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            run = runs[name]
            t = time.perf_counter()
            run["step"]()
            run["times"].append(time.perf_counter() - t)
            run["sched"].step()

    print()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, MLP "
        f"{args.width}-{args.width}-{args.width}-16, batch 64, LambdaLR (a new float lr every "
        f"step), {args.rounds} interleaved rounds; graphs and first-step time from a fresh process"
    )
    ref = statistics.median(runs["AdamW (foreach)"]["times"])
    print(f"{'optimizer':<24} {'graphs':>6} {'first steps s':>13} {'ms/step':>8} {'vs AdamW':>8}")
    for name, run in runs.items():
        med = statistics.median(run["times"])
        print(
            f"{name:<24} {run['graphs']:>6} {run['first']:>13.1f} {med * 1e3:>8.2f} "
            f"{ref / med:>7.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
