"""Triton kernels of smes_fused; installed as ``smes_fused.triton_kernels``."""
