"""Pure-bf16 training with round-to-nearest vs stochastic rounding vs float32 weights.

At p < 0 the SMES update is about lr·|g|^(1−2p), far below the bf16 spacing of the weights
(2^-8 relative), so round-to-nearest drops most updates and training stalls; stochastic
rounding (``SMES(stochastic_rounding=True)``) keeps them in expectation. This trains the same
MLP (scikit-learn's 8×8 digits, 64-256-256-10, minibatches of 64) with bf16 params and
activations, rounding to nearest or stochastically, and with float32 params, at p = 0.5 and
p = −0.08, and reports the final training loss (mean ± std over seeds) and test accuracy.

    python -m bench.bf16_rounding              # writes runs/bf16_rounding/bf16_rounding.csv
    python -m bench.bf16_rounding --out results
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch
from torch import nn

from smes_fused import SMES, lr_for_exponent

from .argtypes import backend_name, finite_float, out_dir, positive_float, positive_int

MODES = ("float32", "bf16 nearest", "bf16 stochastic")


def _data():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def run(mode: str, p: float, lr: float, seed: int, steps: int, backend: str) -> dict:
    (xt, yt), (xv, yv) = _data()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))  # fmt: skip
    dtype = torch.float32 if mode == "float32" else torch.bfloat16
    model = model.to(dtype)
    opt = SMES(model.parameters(), lr=lr, exponent=p, weight_decay=0.0,
               stochastic_rounding=mode == "bf16 stochastic", rounding_seed=seed,
               backend=backend)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        idx = torch.randint(0, len(yt), (64,), generator=g)
        loss = loss_fn(model(xt[idx].to(dtype)).float(), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_loss = float(loss_fn(model(xt.to(dtype)).float(), yt))
        acc = float((model(xv.to(dtype)).argmax(1) == yv).float().mean())
    return {"mode": mode, "p": p, "lr": lr, "seed": seed, "steps": steps,
            "train_loss": train_loss, "test_acc": acc}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bf16_rounding", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--exponents", nargs="+", type=finite_float, default=[0.5, -0.08])
    ap.add_argument("--seeds", type=positive_int, default=3)
    ap.add_argument("--steps", type=positive_int, default=600)
    ap.add_argument("--adamw-lr", type=positive_float, default=1e-3,
                    help="lr at p = 0.5; other p get lr_for_exponent(p, adamw_lr)")  # fmt: skip
    ap.add_argument("--backend", type=backend_name, default="auto")
    ap.add_argument("--out", default=os.path.join("runs", "bf16_rounding"))
    args = ap.parse_args(argv)
    out_dir(ap, args.out)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows, t0 = [], time.perf_counter()
    for p in args.exponents:
        lr = lr_for_exponent(p, adamw_lr=args.adamw_lr)
        for mode in MODES:
            for seed in range(args.seeds):
                rows.append(run(mode, p, lr, seed, args.steps, args.backend))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bf16_rounding.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{'p':>6} {'lr':>8} {'weights':<16} {'train loss (mean ± std)':>24} {'test acc':>9}")
    for p in args.exponents:
        for mode in MODES:
            rs = [r for r in rows if r["p"] == p and r["mode"] == mode]
            losses = [r["train_loss"] for r in rs]
            sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
            acc = statistics.mean(r["test_acc"] for r in rs)
            print(f"{p:>6g} {rs[0]['lr']:>8.3g} {mode:<16} "
                  f"{statistics.mean(losses):>15.4f} ± {sd:<6.4f} {acc:>9.3f}")  # fmt: skip
    print(f"{len(rows)} runs of {args.steps} steps in {time.perf_counter() - t0:.0f} s; "
          f"wrote {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
