"""Syntax-check the CUDA op registration (csrc/smes_cuda_binding.cpp) against this torch's headers.

The binding is compiled only into CUDA builds of the extension; on a CPU-only torch the two
c10/cuda headers it includes are missing, so minimal stand-ins for them are written here. This
catches ATen API and schema-signature mistakes on machines without CUDA torch."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which("g++") or shutil.which("c++")

STUBS = {
    "CUDAStream.h": """#pragma once
#include <c10/core/Device.h>
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
namespace c10 { namespace cuda {
struct CUDAStream { cudaStream_t stream() const { return nullptr; } };
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
} }
""",
    "CUDAGuard.h": """#pragma once
#include <c10/core/Device.h>
namespace c10 { namespace cuda {
struct CUDAGuard { explicit CUDAGuard(c10::Device) {} };
} }
""",
}


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    stub_dir = tmp_path / "c10" / "cuda"
    stub_dir.mkdir(parents=True)
    for name, text in STUBS.items():
        (stub_dir / name).write_text(text)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    csrc = os.path.join(ROOT, "csrc")
    source = os.path.join(csrc, "smes_cuda_binding.cpp")
    flags = ["-std=c++17", "-fsyntax-only", "-w", f"-I{tmp_path}", f"-I{csrc}"]
    cmd = [CXX, *flags, *includes, source]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
