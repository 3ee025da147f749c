"""smes_fused: SMES (Second-Moment Exponential Scaling), Adam with a v^p denominator."""

from . import functional
from .backends import available as available_backends
from .optimizer import SMES, lr_for_exponent

__all__ = ["SMES", "functional", "available_backends", "lr_for_exponent"]
__version__ = "0.1.0"
