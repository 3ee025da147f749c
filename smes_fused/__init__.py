"""smes_fused: SMES (Second-Moment Exponential Scaling), Adam with a v^p denominator."""

from . import functional, in_backward, schedules
from .backends import available as available_backends
from .optimizer import SMES, lr_for_exponent
from .schedules import (
    CosineExponent,
    CyclicExponent,
    ExponentScheduler,
    LinearExponent,
    depth_param_groups,
)

__all__ = [
    "SMES",
    "functional",
    "schedules",
    "in_backward",
    "available_backends",
    "lr_for_exponent",
    "ExponentScheduler",
    "LinearExponent",
    "CosineExponent",
    "CyclicExponent",
    "depth_param_groups",
]
__version__ = "0.1.0"
