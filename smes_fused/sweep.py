"""Balance sweep: the SMES paper's experiment, reproduced in miniature.

Trains a small VGG-style CNN with :class:`smes_fused.SMES` over a grid of balance coefficients
``p`` (the exponent of the second moment in the denominator) and several seeds, and records for
every run the fit (train loss/accuracy), the generalisation (test accuracy, gap) and, per weight
layer from input to output, the mean ratio ``||Δθ|| / ||θ||`` of one optimizer step to the weight
it updates. That per-layer profile is the mechanism the balance theory invokes (p > 0 moves
training towards the output layers, p < 0 towards the input layers); the paper never measures it.

Run ``python -m smes_fused.sweep`` (about 4 minutes on 2 CPU cores) or ``--quick`` (seconds).

Data (nothing is downloaded)
    ``--data digits`` (default): scikit-learn's bundled 8x8 digits, 1797 images, 10 classes. A
    fixed stratified split: 360 test images, 20 % of the rest for validation, the rest to train.
    ``--data cifar10:DIR`` / ``--data cifar100:DIR``: a local copy of the CIFAR python-pickle
    release (``data_batch_1..5`` + ``test_batch``, or ``train`` + ``test``; DIR may also be the
    folder that contains ``cifar-10-batches-py`` / ``cifar-100-python``). 5000 training images
    are held out for validation. No augmentation. These files are unpickled: only point this at
    data you trust.

Model
    VGG-style: two conv-conv-pool blocks (16, 32 channels; 3x3 convs, BatchNorm, ReLU) and a
    two-layer classifier (64 hidden) on digits = 6 weight layers; three blocks (32, 64, 128) and
    256 hidden on CIFAR = 8 weight layers. ``--no-batchnorm`` drops BatchNorm (plain VGG).

Protocol (the paper's, scaled down)
    The paper: batch 128, lr 0.1, L2 weight decay 5e-4, 200 epochs, p from -0.3 to 0.1. Here:
    batch 64 (digits has 1.1k training images), 15 epochs, SMES with betas (0.9, 0.999),
    eps 1e-8, bias correction, L2 weight decay 5e-4 (``decoupled_weight_decay=False``, on every
    parameter), one epoch of linear warm-up then cosine decay to 0, stepped per batch.

Learning rate per exponent
    One lr cannot serve every p: with gradient entries of typical size s the SMES step scales
    like lr * s^(1-2p), so p = 0 needs an SGD-scale lr and p = 0.5 an Adam-scale one, and p < 0
    needs larger still. The grid is therefore centred on a log-linear interpolation through two
    anchors, lr_c(p) = lr0 * (lr_half / lr0)^(2p), with lr0 = 0.3 at p = 0 (SMES's momentum is an
    EMA, so this is torch SGD lr 0.03 with momentum 0.9) and lr_half = 3e-3 at p = 0.5 (Adam);
    it equalises the step for gradient entries of size lr_half / lr0 = 1e-2 and extrapolates to
    p < 0 (lr_c(-0.3) = 4.75). Since that size is only a guess, every p is also trained at
    lr_c(p) * {1/4, 1/2, 1, 2, 4} (``--lr-mults``) and the lr with the best mean *validation*
    accuracy over seeds is kept; the test set plays no part in the choice. Every run of the grid
    is in ``<tag>_runs.csv``; the selected ones in ``<tag>.csv``.

Outputs (in ``--out``, default ``runs/sweep/``, which git ignores; file names start with ``--tag``,
default ``sweep``)
    ``sweep.csv``          one row per (p, seed) at the selected lr: metrics + ratio_<layer>
    ``sweep_runs.csv``     every run of the lr grid (same columns)
    ``sweep_epochs.csv``   per epoch of every run: running train loss/acc, val acc, ratios
    ``sweep_accuracy.png`` train/test accuracy and generalisation gap against p (mean ± std)
    ``sweep_layers.png``   per-layer update/weight ratio, input -> output, one line per p
    and a mean ± std table per p on the console.

Metrics: train loss/accuracy are measured after training, in eval mode, on the whole training
split; ``gap_acc`` = train acc - test acc and ``gap_loss`` = test loss - train loss. A layer's
ratio is ``||W_{t+1} - W_t|| / ||W_t||`` over its weight tensor (bias and BatchNorm excluded),
averaged over every step of training (the L2 decay is part of the step). ``out_in`` is the
output layer's ratio divided by the input layer's.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .optimizer import SMES, lr_for_exponent

DEFAULT_EXPONENTS = (-0.3, -0.2, -0.1, -0.08, 0.0, 0.1, 0.25, 0.5)
DEFAULT_LR_MULTS = (0.25, 0.5, 1.0, 2.0, 4.0)


class DataError(ValueError):
    """The --data argument names something that cannot be loaded."""


# ----------------------------------------------------------------------------------------- data


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32, N x C x H x W, normalised
    y_train: torch.Tensor  # int64
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def size(self) -> int:
        return self.x_train.shape[-1]


def _normalise(x_train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    """Standardise every channel with the training split's statistics."""
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return [torch.from_numpy(((x - mean) / std).astype(np.float32)) for x in (x_train, *others)]


def load_digits_dataset(val_fraction: float = 0.2, n_test: int = 360) -> Dataset:
    """scikit-learn's bundled 8x8 digits with a fixed stratified train/val/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0
    y = d.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=n_test, stratify=y, random_state=0
    )
    x_tr, x_val, y_tr, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction, stratify=y_rest, random_state=1
    )
    xt, xv, xs = _normalise(x_tr, x_val, x_test)
    return Dataset(
        "digits",
        xt,
        torch.from_numpy(y_tr),
        xv,
        torch.from_numpy(y_val),
        xs,
        torch.from_numpy(y_test),
        10,
    )


_CIFAR = {
    # kind: (train files, test files, label key, classes, folder name of the official archive)
    "cifar10": (
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        10,
        "cifar-10-batches-py",
    ),
    "cifar100": (["train"], ["test"], "fine_labels", 100, "cifar-100-python"),
}


def _read_cifar_file(path: str, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise DataError(f"{path}: not a CIFAR python-pickle batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DataError(
            f"{path}: missing key 'data' or '{label_key}' (found {sorted(map(str, batch))})"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"{path}: labels outside [0, {n_classes})")
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, labels


def load_cifar(kind: str, folder: str, n_val: int = 5000, seed: int = 0) -> Dataset:
    """A local CIFAR-10/100 python-pickle folder; ``n_val`` training images become validation."""
    train_files, test_files, label_key, n_classes, archive_dir = _CIFAR[kind]
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise DataError(f"--data {kind}: folder {folder!r} does not exist")
    if not os.path.exists(os.path.join(folder, train_files[0])) and os.path.isdir(
        os.path.join(folder, archive_dir)
    ):
        folder = os.path.join(folder, archive_dir)
    missing = [f for f in train_files + test_files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(
            f"--data {kind}: {folder!r} lacks {', '.join(missing)} (expected the python-pickle "
            f"release: {', '.join(train_files + test_files)}); nothing is downloaded"
        )

    def read(files):
        parts = [_read_cifar_file(os.path.join(folder, f), label_key, n_classes) for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    x, y = read(train_files)
    x_test, y_test = read(test_files)
    if len(x) < 2:
        raise DataError(f"--data {kind}: only {len(x)} training images in {folder!r}")
    n_val = min(n_val, len(x) // 5) if len(x) < 5 * n_val else n_val
    perm = np.random.default_rng(seed).permutation(len(x))
    val, tr = perm[:n_val], perm[n_val:]
    xt, xv, xs = _normalise(x[tr], x[val], x_test)
    return Dataset(
        kind,
        xt,
        torch.from_numpy(y[tr]),
        xv,
        torch.from_numpy(y[val]),
        xs,
        torch.from_numpy(y_test),
        n_classes,
    )


def load_data(spec: str) -> Dataset:
    """``digits`` or ``cifar10:DIR`` / ``cifar100:DIR``."""
    kind, _, folder = spec.partition(":")
    kind = kind.lower().replace("-", "")
    if kind == "digits" and not folder:
        return load_digits_dataset()
    if kind in _CIFAR:
        if not folder:
            raise DataError(f"--data {kind} needs a folder: --data {kind}:/path/to/folder")
        return load_cifar(kind, folder)
    raise DataError(f"--data {spec!r}: expected 'digits', 'cifar10:DIR' or 'cifar100:DIR'")


def subset(data: Dataset, n_train: int | None, seed: int = 0) -> Dataset:
    """The first ``n_train`` training images of a fixed permutation (val/test unchanged)."""
    if not n_train or n_train >= len(data.y_train):
        return data
    idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    idx = idx[:n_train]
    return replace(data, x_train=data.x_train[idx], y_train=data.y_train[idx])


# ---------------------------------------------------------------------------------------- model


class SmallVGG(nn.Module):
    """conv-conv-pool blocks then a two-layer classifier; ``2*len(widths) + 2`` weight layers."""

    def __init__(
        self,
        in_channels: int,
        size: int,
        n_classes: int,
        widths: tuple[int, ...] = (16, 32),
        hidden: int = 64,
        batchnorm: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            for _ in range(2):
                layers.append(nn.Conv2d(c, w, 3, padding=1, bias=not batchnorm))
                if batchnorm:
                    layers.append(nn.BatchNorm2d(w))
                layers.append(nn.ReLU(inplace=True))
                c = w
            layers.append(nn.MaxPool2d(2))
            size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))

    def weight_layers(self) -> list[tuple[str, torch.Tensor]]:
        """(name, weight) of every conv/linear layer, from input to output."""
        out, n_conv, n_fc = [], 0, 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n_conv += 1
                out.append((f"conv{n_conv}", m.weight))
            elif isinstance(m, nn.Linear):
                n_fc += 1
                out.append((f"fc{n_fc}", m.weight))
        return out


def build_model(data: Dataset, batchnorm: bool = True) -> SmallVGG:
    if data.size <= 8:
        return SmallVGG(data.in_channels, data.size, data.n_classes, (16, 32), 64, batchnorm)
    return SmallVGG(data.in_channels, data.size, data.n_classes, (32, 64, 128), 256, batchnorm)


# --------------------------------------------------------------------------- update/weight ratio


class UpdateRatioTracker:
    """Per layer, ``||W_after - W_before|| / ||W_before||`` of each optimizer step.

    Call :meth:`before_step` just before ``optimizer.step()`` and :meth:`after_step` just after;
    :meth:`mean` averages the recorded steps (since the last :meth:`reset`, or all of them).
    """

    def __init__(self, weights: list[torch.Tensor]):
        self.weights = list(weights)
        self._prev: list[torch.Tensor] | None = None
        self.sums = torch.zeros(len(self.weights), dtype=torch.float64)
        self.count = 0
        self.total_sums = torch.zeros_like(self.sums)
        self.total_count = 0

    @torch.no_grad()
    def before_step(self) -> None:
        self._prev = [w.detach().clone() for w in self.weights]

    @torch.no_grad()
    def after_step(self) -> torch.Tensor:
        if self._prev is None:
            raise RuntimeError("after_step() without before_step()")
        r = torch.tensor(
            [
                float(torch.linalg.vector_norm(w - p) / torch.linalg.vector_norm(p))
                for w, p in zip(self.weights, self._prev, strict=True)
            ],
            dtype=torch.float64,
        )
        self._prev = None
        self.sums += r
        self.count += 1
        self.total_sums += r
        self.total_count += 1
        return r

    def mean(self, total: bool = False) -> list[float]:
        s, n = (self.total_sums, self.total_count) if total else (self.sums, self.count)
        return (s / n).tolist() if n else [math.nan] * len(self.weights)

    def reset(self) -> None:
        self.sums.zero_()
        self.count = 0


# ------------------------------------------------------------------------------------- training


@dataclass
class Config:
    exponents: tuple[float, ...] = DEFAULT_EXPONENTS
    seeds: tuple[int, ...] = (0, 1, 2)
    lr_mults: tuple[float, ...] = DEFAULT_LR_MULTS
    lr0: float = 0.3  # centre of the lr grid at p = 0 (SGD scale)
    lr_half: float = 3e-3  # centre of the lr grid at p = 0.5 (Adam scale)
    epochs: int = 15
    batch_size: int = 64
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"  # or "step": x0.2 at 30 %, 60 %, 80 % of training
    warmup_epochs: float = 1.0
    batchnorm: bool = True
    backend: str = "auto"


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


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024):
    """(mean cross-entropy, accuracy) in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    n = max(1, len(y))
    return loss / n, correct / n


def train_run(data: Dataset, p: float, lr: float, seed: int, cfg: Config):
    """One training run. Returns (summary row, list of per-epoch rows)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(data, cfg.batchnorm)
    names, weights = zip(*model.weight_layers(), strict=True)
    opt = SMES(
        model.parameters(),
        lr=lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        exponent=p,
        decoupled_weight_decay=False,
        backend=cfg.backend,
    )
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = min(total, max(1, round(cfg.warmup_epochs * steps_per_epoch)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.schedule)
    )
    tracker = UpdateRatioTracker(list(weights))
    epochs, diverged = [], False
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        tracker.reset()
        run_loss, run_correct = 0.0, 0
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb, yb = data.x_train[idx], data.y_train[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            tracker.before_step()
            opt.step()
            tracker.after_step()
            sched.step()
            run_loss += loss.item() * len(yb)
            run_correct += int((out.argmax(1) == yb).sum())
        if diverged:
            break
        val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
        row = {
            "p": p,
            "lr": lr,
            "seed": seed,
            "epoch": epoch,
            "train_loss_running": run_loss / n,
            "train_acc_running": run_correct / n,
            "val_loss": val_loss,
            "val_acc": val_acc,
        }
        row.update({f"ratio_{k}": v for k, v in zip(names, tracker.mean(), strict=True)})
        epochs.append(row)

    train_loss, train_acc = evaluate(model, data.x_train, data.y_train)
    val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    if diverged or not math.isfinite(train_loss):
        train_loss = val_loss = test_loss = math.nan
    ratios = tracker.mean(total=True)
    summary = {
        "p": p,
        "lr": lr,
        "seed": seed,
        "data": data.name,
        "batchnorm": int(cfg.batchnorm),
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
        "out_in": ratios[-1] / ratios[0] if ratios[0] > 0 else math.nan,
        "seconds": time.perf_counter() - t0,
    }
    summary.update({f"ratio_{k}": v for k, v in zip(names, ratios, strict=True)})
    return summary, epochs


# ------------------------------------------------------------------ parallel execution of runs

# Every run uses one intra-op thread, whatever --jobs: the models are tiny (threads only add
# overhead, and spin-waiting threads are very slow on a shared machine), and a fixed thread count
# keeps a run's result bitwise the same whichever process runs it.
_WORKER: dict = {}


def _init_worker(data: Dataset, cfg: Config, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["data"], _WORKER["cfg"] = data, cfg


def _run_job(job):
    p, lr, seed = job
    return train_run(_WORKER["data"], p, lr, seed, _WORKER["cfg"])


def run_grid(data: Dataset, cfg: Config, jobs: int, progress: bool = True):
    """Every (p, lr, seed) of the grid; returns (summaries, epoch rows) in grid order."""
    from tqdm import tqdm

    grid = [
        (p, centre_lr(p, cfg.lr0, cfg.lr_half) * m, s)
        for p in cfg.exponents
        for m in cfg.lr_mults
        for s in cfg.seeds
    ]
    bar = tqdm(total=len(grid), desc="SMES balance sweep", unit="run", disable=not progress)
    results: dict = {}
    if jobs <= 1:
        threads = torch.get_num_threads()
        _init_worker(data, cfg, 1)
        try:
            for job in grid:
                bar.set_postfix_str(f"p={job[0]:g} lr={job[1]:.3g} seed={job[2]}")
                results[job] = _run_job(job)
                bar.update()
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(jobs, _init_worker, (data, cfg, 1)) as pool:
            # Longest-first is not knowable; the grid order interleaves p values well enough.
            for job, res in zip(grid, pool.imap(_run_job, grid), strict=True):
                results[job] = res
                bar.set_postfix_str(f"p={job[0]:g}")
                bar.update()
    bar.close()
    summaries = [results[j][0] for j in grid]
    epochs = [row for j in grid for row in results[j][1]]
    return summaries, epochs


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


# --------------------------------------------------------------------------------------- output


def write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def ratio_columns(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k.startswith("ratio_")]


def aggregate(rows: list[dict], key: str) -> dict[float, tuple[float, float]]:
    """Per p: (mean, std) of ``key`` over seeds (population std; 0 for one seed)."""
    out = {}
    for p in sorted({r["p"] for r in rows}):
        v = np.array([r[key] for r in rows if r["p"] == p], dtype=np.float64)
        out[p] = (float(np.mean(v)), float(np.std(v)))
    return out


def summary_table(rows: list[dict], lr_grid: list[dict] | None = None) -> str:
    cols = [
        ("train_loss", "train loss", 1.0, ".3f"),
        ("train_acc", "train acc %", 100.0, ".1f"),
        ("test_acc", "test acc %", 100.0, ".2f"),
        ("gap_acc", "gap acc %", 100.0, ".2f"),
        ("gap_loss", "gap loss", 1.0, ".3f"),
        ("out_in", "out/in ratio", 1.0, ".2f"),
    ]
    ps = sorted({r["p"] for r in rows})
    n_seeds = len({r["seed"] for r in rows})
    head = ["p", "lr"] + [c[1] for c in cols]
    body = []
    for p in ps:
        rs = [r for r in rows if r["p"] == p]
        line = [f"{p:g}", f"{rs[0]['lr']:.3g}"]
        edge = ""
        if lr_grid:
            lrs = sorted({r["lr"] for r in lr_grid if r["p"] == p})
            if len(lrs) > 1 and rs[0]["lr"] in (lrs[0], lrs[-1]):
                edge = "*"
        line[1] += edge
        for key, _, scale, fmt in cols:
            v = np.array([r[key] for r in rs], dtype=np.float64) * scale
            line.append(f"{np.mean(v):{fmt}} ± {np.std(v):{fmt}}")
        body.append(line)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    fmt_line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths, strict=True))  # noqa: E731
    lines = [fmt_line(head), fmt_line(["-" * w for w in widths])]
    lines += [fmt_line(b) for b in body]
    lines.append(
        f"mean ± std over {n_seeds} seed(s); lr selected per p on the validation split"
        + (" (* = edge of the lr grid)" if any("*" in b[1] for b in body) else "")
    )
    return "\n".join(lines)


def _p_colors(ps):
    import matplotlib

    cmap = matplotlib.colormaps["plasma"]  # truncated: its yellow end is hard to see
    lo, hi = min(ps), max(ps)
    return {p: cmap(0.0 if hi == lo else 0.85 * (p - lo) / (hi - lo)) for p in ps}


def plot_accuracy(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = sorted({r["p"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, marker in (("test_acc", "test", "o"), ("train_acc", "train", "s")):
        a = aggregate(rows, key)
        ax1.errorbar(
            ps,
            [100 * a[p][0] for p in ps],
            yerr=[100 * a[p][1] for p in ps],
            marker=marker,
            capsize=4,
            label=f"{label} accuracy",
        )
    ax1.set_xlabel("balance coefficient p")
    ax1.set_ylabel("accuracy (%)")
    ax1.set_title("accuracy vs p (mean ± std over seeds)")
    ax1.legend()
    for key, label, marker in (("gap_acc", "train acc − test acc (%)", "o"),):
        a = aggregate(rows, key)
        ax2.errorbar(
            ps,
            [100 * a[p][0] for p in ps],
            yerr=[100 * a[p][1] for p in ps],
            marker=marker,
            capsize=4,
            color="C3",
            label=label,
        )
    ax2.set_xlabel("balance coefficient p")
    ax2.set_ylabel("accuracy gap (%)", color="C3")
    a = aggregate(rows, "gap_loss")
    ax2b = ax2.twinx()
    ax2b.errorbar(
        ps,
        [a[p][0] for p in ps],
        yerr=[a[p][1] for p in ps],
        marker="s",
        capsize=4,
        color="C2",
        label="test loss − train loss",
    )
    ax2b.set_ylabel("loss gap", color="C2")
    ax2.set_title("generalisation gap vs p")
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax2b.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc="best")
    for ax in (ax1, ax2):
        ax.axvline(0.0, color="grey", lw=0.7, ls=":")
        ax.axvline(0.5, color="grey", lw=0.7, ls=":")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ratio_columns(rows)
    names = [c[len("ratio_") :] for c in cols]
    ps = sorted({r["p"] for r in rows})
    colors = _p_colors(ps)
    x = np.arange(len(cols))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in ps:
        prof = np.array([[r[c] for c in cols] for r in rows if r["p"] == p], dtype=np.float64)
        mean = prof.mean(axis=0)
        lr = next(r["lr"] for r in rows if r["p"] == p)
        ax1.plot(x, mean, marker="o", color=colors[p], label=f"p={p:g} (lr {lr:.3g})")
        # shape only: divide by the profile's geometric mean over layers (lr drops out)
        ax2.plot(x, mean / np.exp(np.log(mean).mean()), marker="o", color=colors[p])
    ax1.set_yscale("log")
    ax1.set_ylabel("mean ‖Δθ‖ / ‖θ‖ per step")
    ax1.set_title("per-layer update/weight ratio")
    ax2.set_yscale("log")
    ax2.set_ylabel("ratio / its geometric mean over layers")
    ax2.set_title("profile shape (lr-independent)")
    for ax in (ax1, ax2):
        ax.set_xticks(x, names)
        ax.set_xlabel("layer (input → output)")
        ax.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI


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
    doc = __doc__.split("\n\n", 1)
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


def _title(rows: list[dict]) -> str:
    r = rows[0]
    bn = "" if r.get("batchnorm", 1) else " (no BatchNorm)"
    n_seeds = len({x["seed"] for x in rows})
    return (
        f"SMES balance sweep: {r.get('data', '?')}, small VGG{bn}, {r.get('epochs', '?')} epochs, "
        f"{n_seeds} seed(s)"
    )


def read_csv(path: str) -> list[dict]:
    """Rows written by :func:`write_csv`, numbers parsed back."""

    def num(v: str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with open(path, newline="") as f:
        return [{k: num(v) for k, v in r.items()} for r in csv.DictReader(f)]


def replot(stem: str) -> int:
    if not os.path.isfile(stem + ".csv"):
        print(f"error: --replot needs {stem}.csv (run the sweep first)", file=sys.stderr)
        return 2
    rows = read_csv(stem + ".csv")
    runs = read_csv(stem + "_runs.csv") if os.path.isfile(stem + "_runs.csv") else None
    title = _title(rows)
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
    title = _title(rows)
    if not args.no_plots:
        plot_accuracy(rows, stem + "_accuracy.png", title)
        plot_layers(rows, stem + "_layers.png", title)
    print(summary_table(rows, runs))
    print(f"wall time {wall:.1f} s ({n_runs} runs); wrote {stem}.csv, {stem}_runs.csv, ", end="")
    print(f"{stem}_epochs.csv" + ("" if args.no_plots else f", {stem}_accuracy/_layers.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
