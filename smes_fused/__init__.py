"""smes_fused: SMES (Second-Moment Exponential Scaling), Adam with a v^p denominator."""

from . import functional
from .backends import available as available_backends
from .optimizer import SMES

__all__ = ["SMES", "functional", "available_backends"]
__version__ = "0.1.0"
