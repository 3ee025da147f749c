"""Build smes_fused, with its compiled extension smes_fused._C (csrc/).

    pip install --no-build-isolation -e .

The extension holds the "cpu" backend's kernels (always) and the "cuda" backend's kernels (only
when SMES_BUILD_CUDA is not "0" AND this torch is a CUDA build AND CUDA_HOME/nvcc is found; a GPU
is never needed to build). Without a C++ compiler the package still installs and imports; the
"cpu"/"cuda" backends then report themselves unavailable. SMES_BUILD_EXT=0 skips the extension.

The CPU kernels are compiled once per instruction set (csrc/smes_cpu_{avx512,avx2,base}.cpp use
`#pragma GCC target`) and chosen at run time: never -march=native. The CUDA kernels are compiled
for SMES_CUDA_ARCHS (default "80;90", plus PTX of the last one).
"""

import os
import sys
import sysconfig

import setuptools
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILDS_WHEEL = bool({"bdist_wheel", "editable_wheel"} & set(sys.argv))
# pip's metadata step (dist_info) runs bdist_wheel's code as well on setuptools < 70.1
NEEDS_BDIST_WHEEL = BUILDS_WHEEL or "dist_info" in sys.argv


def _check_build_environment():
    """With --no-build-isolation, pip builds with what this environment has: say what is missing
    in words, rather than setuptools' `invalid command 'bdist_wheel'` or a silent CPU-less build."""
    missing = []
    try:
        import wheel  # noqa: F401
    except ImportError:
        major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
        if NEEDS_BDIST_WHEEL and (major, minor) < (70, 1):  # bdist_wheel is in setuptools 70.1+
            missing.append(f"wheel (or setuptools >= 70.1; this one is {setuptools.__version__})")
    if BUILDS_WHEEL and os.environ.get("SMES_BUILD_EXT", "1") != "0":
        try:
            import torch  # noqa: F401
        except ImportError:
            missing.append("torch (the C++ extension is built against the torch installed here)")
    if missing:
        sys.exit(
            "smes-fused: building without build isolation needs, in this environment: "
            + "; ".join(missing)
            + ". Install them first: `pip install -r requirements.txt` (or `pip install "
            "torch==2.13.0 ninja setuptools wheel`), then `pip install --no-build-isolation -e .`"
            ". SMES_BUILD_EXT=0 installs the pure-Python package without torch at build time."
        )


_check_build_environment()


def _ext_modules():
    if os.environ.get("SMES_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # building metadata without torch: pure-Python package
        return [], {}

    cpu_sources = [
        "csrc/smes_cpu.cpp",
        "csrc/smes_cpu_avx512.cpp",
        "csrc/smes_cpu_avx2.cpp",
        "csrc/smes_cpu_base.cpp",
    ]
    # -fopenmp: at::parallel_for is header-inline; without it the one parallel region per bucket
    # silently runs on one thread.
    cxx = ["-O3", "-fopenmp", "-Wno-psabi", "-Wno-maybe-uninitialized"]
    link = ["-fopenmp"]
    want_cuda = os.environ.get("SMES_BUILD_CUDA", "1") != "0"
    with_cuda = bool(want_cuda and torch.version.cuda and cpp_extension.CUDA_HOME)
    if with_cuda:
        archs = os.environ.get("SMES_CUDA_ARCHS", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        ext = cpp_extension.CUDAExtension(
            "smes_fused._C",
            cpu_sources + ["csrc/smes_cuda.cu", "csrc/smes_cuda_binding.cpp"],
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("SMES_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", *gencode]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "smes_fused._C",
            cpu_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """pip builds in a new temporary folder each time, so every reinstall (the README's two
        commands, one after the other) would compile everything again: keep ninja's objects in
        build/, per platform, Python and torch, and recompile only what changed."""

        def finalize_options(self):
            super().finalize_options()
            py = sys.implementation.cache_tag
            tag = f"{sysconfig.get_platform()}-{py}-torch{torch.__version__}"
            self.build_temp = os.path.join(HERE, "build", f"temp.{tag}")

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _ext_modules()

setup(
    # The Triton kernels live in the top-level folder triton_kernels/ but install as
    # smes_fused.triton_kernels, so they never shadow (or get shadowed by) the unrelated
    # distribution that also uses the import name `triton_kernels`.
    packages=["smes_fused", "smes_fused.backends", "smes_fused.sweep", "smes_fused.triton_kernels"],
    package_dir={"smes_fused.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
