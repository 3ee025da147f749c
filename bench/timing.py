"""The one timing loop (interleaved rounds) and the peak-memory probe, for CPU and CUDA.

A round times every competitor's step once; successive rounds alternate the order
(A B C, C B A, A B C, ...) so that no competitor always runs right after the same one. The
first ``warmup`` rounds are discarded. CPU steps are timed with ``time.perf_counter``; CUDA
steps with CUDA events, after zeroing a 256 MiB buffer so each step starts with a cold L2
cache (what ``triton.testing.do_bench`` does), and with one synchronisation per round.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch

Step = Callable[[], object]


def interleaved(
    steps: Sequence[Step],
    *,
    warmup: int,
    repeats: int,
    device: torch.device,
    on_round: Callable[[], None] = lambda: None,
) -> list[list[float]]:
    """Seconds per step: ``times[i][r]`` is competitor ``i`` in timed round ``r``."""
    time_round = _cuda_round(device) if device.type == "cuda" else _cpu_round
    times: list[list[float]] = [[] for _ in steps]
    for r in range(warmup + repeats):
        order = list(range(len(steps)))
        if r % 2:
            order.reverse()
        seconds = time_round([steps[i] for i in order])
        if r >= warmup:
            for i, s in zip(order, seconds, strict=True):
                times[i].append(s)
        on_round()
    return times


def _cpu_round(steps: Sequence[Step]) -> list[float]:
    out = []
    for step in steps:
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def _cuda_round(device: torch.device) -> Callable[[Sequence[Step]], list[float]]:
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)

    def time_round(steps: Sequence[Step]) -> list[float]:
        events = []
        for step in steps:
            flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]

    return time_round


# --- peak memory ---


def peak_memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated rise"
    return "peak RSS rise (VmHWM)" if _reset_vmhwm() else "peak RSS rise (ru_maxrss, lifetime)"


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[list[int]]:
    """Yields a one-element list that holds, after the block, how far the block raised peak
    memory above what was in use when it began, in bytes.

    CUDA: the caching allocator's exact peak. CPU: torch has no CPU allocator statistics
    (and tracemalloc does not see its allocations), so this is the process's peak resident set
    size: reset through /proc/self/clear_refs where Linux allows it, else ``ru_maxrss``, which
    only rises past the process's earlier peak. Free heap memory is returned to the OS first
    (glibc ``malloc_trim``) so that reused pages do not hide new allocations.
    """
    out = [0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out[0] = torch.cuda.max_memory_allocated(device) - base
        return
    _malloc_trim()
    if _reset_vmhwm():
        base = _proc_status_bytes("VmRSS")
        yield out
        out[0] = max(0, _proc_status_bytes("VmHWM") - base)
    else:
        base = _maxrss_bytes()
        yield out
        out[0] = max(0, _maxrss_bytes() - base)


def _reset_vmhwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _maxrss_bytes() -> int:
    unit = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc
