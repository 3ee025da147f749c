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


def device(p: argparse.ArgumentParser, name: str) -> torch.device:
    """``auto`` → cuda if there is one, else cpu; an explicit cuda without one is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    return torch.device(name)


def out_dir(p: argparse.ArgumentParser, path: str) -> str:
    """A folder to write into, checked before the run (not after it, with its results lost)."""
    if os.path.exists(path) and not os.path.isdir(path):
        p.error(f"--out {path}: exists and is not a folder")
    return path
