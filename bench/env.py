"""What a result row must carry to be reproducible: device, versions, commit, threads, date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short HEAD hash, with ``-dirty`` when the working tree has changes; ``unknown`` if none."""

    def git(*args: str) -> str:
        return subprocess.run(
            ("git", "-C", REPO, *args), capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return commit + ("-dirty" if dirty else "")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: either way not part of this run
        return "none"


def smes_cpu_isa() -> str:
    """The CPU kernel set smes_fused's extension runs ("avx512", "avx2", "base"), or "none"."""
    try:
        from smes_fused import _ops

        return _ops.cpu_isa() or "none"
    except Exception:  # not built, or an older extension
        return "none"


def torch_cpu_capability() -> str:
    """The instruction set of torch's own CPU kernels ("AVX512", "AVX2", "DEFAULT", ...; capped by
    ATEN_CPU_CAPABILITY), or "unknown"."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an older torch
        return "unknown"


def load_average() -> float:
    """The 1-minute load average (runnable threads, all processes), or NaN where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return float("nan")


def environment(device: torch.device) -> dict[str, object]:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = cpu_model()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name,
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_start": load_average(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "smes_fused": _version("smes_fused"),
        "smes_cpu_isa": smes_cpu_isa(),
        "torch_cpu_capability": torch_cpu_capability(),
        "git_commit": git_commit(),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
    }
