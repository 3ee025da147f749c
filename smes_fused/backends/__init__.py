"""Backend registry and the ``backend="auto"`` policy of SPEC §3.

A backend is an object with

- ``name``: its public name;
- ``unavailable() -> str | None``: None when it can run on this machine, else why not and how to
  get it (the build command, a package to install);
- ``cannot_run(key: BucketKey) -> str | None``: None when it can apply a bucket of that device and
  dtypes, else why not;
- ``steps_on_device``: True when the step counts must live on the parameters' device (fused
  kernels read them there);
- ``__call__(bucket, *, grad_scale, found_inf) -> None``: apply SPEC §1 to every tensor of the
  bucket, in place. ``grad_scale``/``found_inf`` are float32 scalar tensors on the bucket's
  device, or None. When found_inf is non-zero nothing may change.

Backends register themselves with :func:`register`; optional ones (compiled extension, Triton)
register a backend that reports itself unavailable rather than failing at import.
"""

from __future__ import annotations

from .._bucket import BucketKey  # noqa: F401  (re-export for backends)

_REGISTRY: dict = {}

# Order of preference for backend="auto", per device type.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "foreach"),
    "cpu": ("cpu", "foreach"),
}
FALLBACK = "foreach"
NAMES = ("reference", "foreach", "cpu", "cuda", "triton")


def register(backend) -> None:
    _REGISTRY[backend.name] = backend


def get(name: str):
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}: expected 'auto' or one of {', '.join(NAMES)}")
    if name not in _REGISTRY:
        raise RuntimeError(f"backend {name!r} is not available: it is not part of this build")
    return _REGISTRY[name]


def available() -> dict[str, str | None]:
    """Each backend's name → None if it can run here, else the reason it cannot."""
    return {name: _REGISTRY[name].unavailable() for name in NAMES if name in _REGISTRY}


def resolve(name: str, key: BucketKey):
    """The backend that applies a bucket, or an error that says why the asked one cannot."""
    if name == "auto":
        for cand in AUTO_ORDER.get(key.device.type, ()):
            b = _REGISTRY.get(cand)
            if b is not None and b.unavailable() is None and b.cannot_run(key) is None:
                return b
        return get(FALLBACK)
    b = get(name)
    why = b.unavailable()
    if why is not None:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    why = b.cannot_run(key)
    if why is not None:
        raise RuntimeError(
            f"backend {name!r} cannot run a bucket of {key.param_dtype} params with "
            f"{key.state_dtype} state on {key.device}: {why}"
        )
    return b


# Every backend module registers itself when the package is imported, not on first use: an
# import inside a step would break torch.compile's graph the first time a process steps under it.
# None of them imports Triton or touches CUDA at import time.
from . import compiled, foreach, reference, triton  # noqa: E402, F401
