"""Shared by the test modules that run every CPU backend and the Triton interpreter.

``use_triton_interpreter()`` sets TRITON_INTERPRET=1 before the kernels are created (and leaves it
set: Triton reads it again at launch), reloading them if an earlier module imported them for a
GPU, and returns their module (None without Triton); ``require(name)`` skips a test whose backend
cannot run here, with the reason."""

from __future__ import annotations

import importlib
import os

import pytest

import smes_fused

BACKENDS = ["reference", "foreach", "cpu", "triton"]


def use_triton_interpreter():
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        kernels = importlib.import_module("smes_fused.triton_kernels.smes")
    except ImportError:  # no Triton: available_backends() says so and the tests skip
        return None
    return kernels if kernels.INTERPRET else importlib.reload(kernels)


def require(name: str) -> str:
    why = smes_fused.available_backends().get(name, "not registered in this build")
    if why is not None:
        pytest.skip(f"backend {name!r} cannot run here: {why}")
    return name
