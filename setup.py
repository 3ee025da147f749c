"""Build smes_fused. The compiled extension (smes_fused._C) is added by csrc/ (see README)."""

from setuptools import setup

setup(
    # The Triton kernels live in the top-level folder triton_kernels/ but install as
    # smes_fused.triton_kernels, so they never shadow (or get shadowed by) the unrelated
    # distribution that also uses the import name `triton_kernels`.
    packages=["smes_fused", "smes_fused.backends", "smes_fused.triton_kernels"],
    package_dir={"smes_fused.triton_kernels": "triton_kernels"},
)
