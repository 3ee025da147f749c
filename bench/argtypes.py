"""Argument checks shared by the bench commands: argparse types that turn a bad value into a
usage error naming the flag (not a traceback after the run, or a run that skips everything),
and the device and output folder checked before any work."""

from __future__ import annotations

import argparse
import math
import os

import torch


def _number(kind, s: str):
    try:
        return kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None


def positive_int(s: str) -> int:
    x = _number(int, s)
    if x < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {x}")
    return x


def non_negative_int(s: str) -> int:
    x = _number(int, s)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {x}")
    return x


def finite_float(s: str) -> float:
    x = _number(float, s)
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be finite, got {x}")
    return x


def positive_float(s: str) -> float:
    """> 0; inf allowed (a clipping norm of inf: the norm without clipping)."""
    x = _number(float, s)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {x}")
    return x


def non_negative_float(s: str) -> float:
    x = _number(float, s)
    if not (math.isfinite(x) and x >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {x}")
    return x


def file_part(s: str) -> str:
    """A piece of a file name (a suffix, a tag): no folder separators."""
    if not s or os.sep in s or (os.altsep and os.altsep in s) or s in (".", ".."):
        raise argparse.ArgumentTypeError(f"must be a plain name without {os.sep!r}, got {s!r}")
    return s


def backend_name(s: str) -> str:
    """An SMES backend name (``auto`` included), checked before the run."""
    try:
        from smes_fused.backends import NAMES
    except Exception:  # a broken package: the run reports why each backend is skipped
        return s
    if s not in ("auto", *NAMES):
        raise argparse.ArgumentTypeError(
            f"unknown backend {s!r}; expected one of {', '.join(('auto', *NAMES))}"
        )
    return s


def distinct(p: argparse.ArgumentParser, flag: str, values) -> None:
    """A list flag given the same value twice is a usage error (one cell per value)."""
    if values is not None and len(set(values)) != len(values):
        p.error(f"{flag}: a value is given more than once: {' '.join(map(str, values))}")


def device(p: argparse.ArgumentParser, name: str) -> torch.device:
    """``auto`` → cuda if there is one, else cpu; an explicit cuda without one is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    return torch.device(name)


def out_dir(p: argparse.ArgumentParser, path: str) -> str:
    """A folder to write into, made and checked before the run (not after it, with its results
    lost)."""
    if os.path.exists(path) and not os.path.isdir(path):
        p.error(f"--out {path}: exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        p.error(f"--out {path}: cannot make the folder ({e.strerror})")
    if not os.access(path, os.W_OK | os.X_OK):
        p.error(f"--out {path}: the folder is not writable")
    return path
