"""The CPU kernel's arithmetic cost per element, without the memory system.

    python -m bench.compute_floor

Calls ``torch.ops.smes_fused.smes_step_`` on one thread on a bucket small enough to stay in L2
(4 arrays x 128 KB), for p = 0.5, 0 and general values, and subtracts the op's fixed per-call cost
(measured on a 16-element bucket). The result is the compute floor of each exponent class: when
the memory system delivers bytes faster than this, the kernel is compute-bound. Medians of
interleaved repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .argtypes import finite_float, positive_int

FLAGS = 1 | 2 | 16  # bias correction, decoupled decay, track v


def _call(n: int, exponent: float):
    from smes_fused import _ops

    if not _ops.HAVE_C:
        raise SystemExit(f"the compiled extension is missing: {_ops.unavailable_reason()}")
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-2
    m, v = torch.zeros(n), torch.rand(n, generator=gen) * 1e-4
    steps = [torch.zeros(())]
    hyper = torch.tensor(
        [[1e-3, 0.9, 0.999, 1e-8, exponent, 1e-2, FLAGS, 0.1, 0.1, 0.0]], dtype=torch.float64
    )  # columns: smes_fused._ops.HYPER_COLUMNS
    return lambda: torch.ops.smes_fused.smes_step_(
        [p], [g], [m], [v], [], steps, hyper, [], None, None
    )


def measure(n: int, exponents, calls: int, repeats: int) -> dict[float, float]:
    """Median seconds per call for each exponent, timed in interleaved rounds."""
    fns = {e: _call(n, e) for e in exponents}
    for f in fns.values():
        for _ in range(calls):
            f()
    times: dict[float, list[float]] = {e: [] for e in exponents}
    for _ in range(repeats):
        for e, f in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                f()
            times[e].append((time.perf_counter() - t) / calls)
    return {e: statistics.median(ts) for e, ts in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.compute_floor", description=__doc__)
    ap.add_argument("--elements", type=positive_int, default=32768,
                    help="bucket size (default 32768)")  # fmt: skip
    ap.add_argument("--exponents", type=finite_float, nargs="+", default=[0.5, 0.0, 0.37, -0.08])
    ap.add_argument("--repeats", type=positive_int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from smes_fused import _ops

    overhead = min(measure(16, args.exponents, 200, args.repeats).values())
    per_call = measure(args.elements, args.exponents, 200, args.repeats)
    print(f"CPU kernel set: {_ops.cpu_isa()}; 1 thread; {args.elements} elements per call; "
          f"fixed cost per call {overhead * 1e6:.1f} us (subtracted)")  # fmt: skip
    print("\n".join(report(per_call, overhead, args.elements)))


def report(per_call: dict[float, float], overhead: float, n: int) -> list[str]:
    """One line per exponent: ns per element with the fixed cost per call taken off, and the
    ratio to p = 0.5; a call no longer than the fixed cost (load, or too few elements) is said
    to be unmeasurable rather than given a cost of zero or less."""
    ns = {e: (t - overhead) / n * 1e9 for e, t in per_call.items() if t > overhead}
    lines = []
    for e, t in per_call.items():
        if e not in ns:
            lines.append(
                f"p = {e:g}: not measurable: the call ({t * 1e6:.1f} us) took no longer than the "
                f"fixed cost ({overhead * 1e6:.1f} us); use more --elements or an idle machine"
            )
            continue
        rel = f"  ({ns[e] / ns[0.5]:.2f}x p = 0.5)" if 0.5 in ns else ""
        lines.append(f"p = {e:g}: {ns[e]:.3f} ns/element{rel}")
    return lines


if __name__ == "__main__":
    main()
