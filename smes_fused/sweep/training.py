"""The training protocol: configuration, lr grid centre and schedule, one run, lr selection."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..optimizer import SMES, lr_for_exponent
from ..schedules import CosineExponent, CyclicExponent, LinearExponent
from .data import Dataset
from .model import build_model
from .tracker import UpdateRatioTracker

DEFAULT_EXPONENTS = (-0.3, -0.2, -0.1, -0.08, 0.0, 0.1, 0.25, 0.5)
DEFAULT_LR_MULTS = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass
class Config:
    exponents: tuple[float, ...] = DEFAULT_EXPONENTS
    seeds: tuple[int, ...] = (0, 1, 2)
    lr_mults: tuple[float, ...] = DEFAULT_LR_MULTS
    lr0: float = 0.3  # centre of the lr grid at p = 0 (SGD scale)
    lr_half: float = 3e-3  # centre of the lr grid at p = 0.5 (Adam scale)
    lr: float | None = None  # if set: the centre of the lr grid for every p (no interpolation)
    epochs: int = 15
    batch_size: int = 64  # 0: full batch
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"  # or "step": x0.2 at 30 %, 60 %, 80 % of training
    warmup_epochs: float = 1.0
    batchnorm: bool = True
    backend: str = "auto"
    model: str = "vgg"  # or "mlp" (Wilson's data always get the linear model)
    mlp_depth: int = 8
    mlp_width: int = 256
    init: str | None = None  # "torch" or "he"; None: torch's with BatchNorm, He's without
    log_every: int = 1  # epochs between the per-epoch rows (and their validation pass)
    # SPEC §4 settings of every run: AdamP/SGDP's projection, RAdam's rectification, and an
    # exponent schedule from exponent_start to the run's p over training ("linear", "cosine"),
    # or between them with a period of 1/4 of training ("cyclic").
    projection: bool = False
    rectify: bool = False
    exponent_schedule: str | None = None
    exponent_start: float = 0.5

    def grid_centre(self, p: float) -> float:
        """The centre of p's lr grid: ``lr`` if set, else :func:`centre_lr`."""
        return self.lr if self.lr is not None else centre_lr(p, self.lr0, self.lr_half)


def centre_lr(p: float, lr0: float, lr_half: float) -> float:
    """Log-linear interpolation: lr0 at p = 0, lr_half at p = 0.5 (extrapolated elsewhere);
    :func:`smes_fused.lr_for_exponent` with ``typical_grad = lr_half / lr0``."""
    return lr_for_exponent(p, adamw_lr=lr_half, typical_grad=lr_half / lr0)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "step":
        return 0.2 ** sum(frac >= m for m in (0.3, 0.6, 0.8))
    raise ValueError(f"schedule must be 'cosine' or 'step', got {schedule!r}")


def loss_and_correct(out: torch.Tensor, y: torch.Tensor, kind: str = "cross_entropy"):
    """(summed loss, number right) of a batch. ``squared``: 0.5 (f(x) - y)^2, right iff
    sign f(x) = y (an output of exactly 0 counts as wrong); else cross-entropy and argmax."""
    if kind == "squared":
        return 0.5 * (out - y).pow(2).sum(), int((out * y > 0).sum())
    return F.cross_entropy(out, y, reduction="sum"), int((out.argmax(1) == y).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int = 1024,
    loss: str = "cross_entropy",
):
    """(mean loss, accuracy) in eval mode; ``loss`` as in :func:`loss_and_correct`."""
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(y), batch):
        s, c = loss_and_correct(model(x[i : i + batch]), y[i : i + batch], loss)
        total += float(s)
        correct += c
    n = max(1, len(y))
    return total / n, correct / n


def train_run(data: Dataset, p: float, lr: float, seed: int, cfg: Config):
    """One training run. Returns (summary row, list of per-epoch rows)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(data, cfg.batchnorm, cfg.model, cfg.mlp_depth, cfg.mlp_width, cfg.init)
    names, weights = zip(*model.weight_layers(), strict=True)
    opt = SMES(
        model.parameters(),
        lr=lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        exponent=cfg.exponent_start if cfg.exponent_schedule else p,
        decoupled_weight_decay=False,
        projection=cfg.projection,
        rectify=cfg.rectify,
        track_second_moment=True if cfg.exponent_schedule else None,
        backend=cfg.backend,
    )
    n = len(data.y_train)
    batch = n if cfg.batch_size <= 0 else min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    total = steps_per_epoch * cfg.epochs
    warmup = min(total, max(1, round(cfg.warmup_epochs * steps_per_epoch)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.schedule)
    )
    p_sched = None
    if cfg.exponent_schedule == "linear":
        p_sched = LinearExponent(opt, cfg.exponent_start, p, total_steps=total)
    elif cfg.exponent_schedule == "cosine":
        p_sched = CosineExponent(opt, cfg.exponent_start, p, total_steps=total)
    elif cfg.exponent_schedule == "cyclic":
        p_sched = CyclicExponent(opt, cfg.exponent_start, p, period=max(2, total // 4))
    elif cfg.exponent_schedule is not None:
        raise ValueError(f"unknown exponent_schedule {cfg.exponent_schedule!r}")
    tracker = UpdateRatioTracker(list(weights))
    evaluate_ = functools.partial(evaluate, loss=data.loss)
    epochs, diverged = [], False
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        if (epoch - 1) % cfg.log_every == 0:
            tracker.reset()
            run_loss, run_correct, run_n = 0.0, 0, 0
        # full batch: no shuffling (the order only changes the summation's rounding)
        perm = torch.randperm(n, generator=gen) if batch < n else None
        for i in range(0, n, batch):
            if perm is None:
                xb, yb = data.x_train, data.y_train
            else:
                idx = perm[i : i + batch]
                xb, yb = data.x_train[idx], data.y_train[idx]
            out = model(xb)
            loss_sum, correct = loss_and_correct(out, yb, data.loss)
            loss = loss_sum / len(yb)
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            tracker.before_step()
            opt.step()
            tracker.after_step()
            sched.step()
            if p_sched is not None:
                p_sched.step()
            run_loss += loss.item() * len(yb)
            run_correct += correct
            run_n += len(yb)
        if diverged:
            break
        if epoch % cfg.log_every and epoch != cfg.epochs:
            continue
        val_loss, val_acc = evaluate_(model, data.x_val, data.y_val)
        row = {
            "p": p,
            "lr": lr,
            "seed": seed,
            "epoch": epoch,
            # over the epochs since the previous row (--log-every), as the weights moved
            "train_loss_running": run_loss / run_n,
            "train_acc_running": run_correct / run_n,
            "val_loss": val_loss,
            "val_acc": val_acc,
        }
        row.update({f"ratio_{k}": v for k, v in zip(names, tracker.mean(), strict=True)})
        epochs.append(row)

    train_loss, train_acc = evaluate_(model, data.x_train, data.y_train)
    val_loss, val_acc = evaluate_(model, data.x_val, data.y_val)
    test_loss, test_acc = evaluate_(model, data.x_test, data.y_test)
    if diverged or not math.isfinite(train_loss):
        train_loss = val_loss = test_loss = math.nan
    ratios = tracker.mean(total=True)
    with torch.no_grad():
        weight_norm = float(torch.cat([w.detach().flatten() for w in weights]).norm())
    summary = {
        "p": p,
        "lr": lr,
        "seed": seed,
        "data": data.name,
        "model": "linear" if data.loss == "squared" else cfg.model,
        "batchnorm": int(cfg.batchnorm and data.loss != "squared"),
        "init": "zero"
        if data.loss == "squared"
        else cfg.init or ("torch" if cfg.batchnorm else "he"),
        "n_train": n,
        "epochs": cfg.epochs,
        "diverged": int(diverged),
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "gap_acc": train_acc - test_acc,
        "gap_loss": test_loss - train_loss,
        "weight_norm": weight_norm,
        "out_in": ratios[-1] / ratios[0] if ratios[0] > 0 else math.nan,
    }
    if data.loss == "squared":  # Wilson's construction: the error and the solution
        summary["test_err"] = 1.0 - test_acc
        summary["test_neg"] = float((data.y_test < 0).float().mean())
        summary.update(model.solution())
    summary["seconds"] = time.perf_counter() - t0
    summary.update({f"ratio_{k}": v for k, v in zip(names, ratios, strict=True)})
    return summary, epochs


def select_lr(rows: list[dict]) -> dict[float, float]:
    """Per p, the lr with the best mean validation accuracy over seeds (ties: lower val loss)."""
    best: dict[float, tuple] = {}
    for p in sorted({r["p"] for r in rows}):
        for lr in sorted({r["lr"] for r in rows if r["p"] == p}):
            rs = [r for r in rows if r["p"] == p and r["lr"] == lr]
            acc = float(np.mean([r["val_acc"] for r in rs]))
            loss = np.mean([r["val_loss"] for r in rs])
            key = (acc, -loss if math.isfinite(loss) else -math.inf)
            if p not in best or key > best[p][0]:
                best[p] = (key, lr)
    return {p: v[1] for p, v in best.items()}
