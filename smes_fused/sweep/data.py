"""Data of the balance sweep: the bundled digits, a local CIFAR folder, training subsets."""

from __future__ import annotations

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
