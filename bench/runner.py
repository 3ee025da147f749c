"""Runs the cells: for each shape set and exponent, set up every competitor, time them
interleaved, and turn the times into result rows."""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from .competitors import REFERENCE, Spec, StateFn, specs
from .env import load_average
from .shapes import ShapeSet
from .timing import Step, interleaved, peak_memory, peak_memory_method


@dataclasses.dataclass(frozen=True)
class Config:
    device: torch.device
    sets: tuple[ShapeSet, ...]
    exponents: tuple[float, ...]
    backends: tuple[str, ...]  # SMES backends to run
    warmup: int
    repeats: int
    compile: bool = False
    dtype: torch.dtype = torch.float32  # params and grads (16-bit: 16-bit state everywhere)
    projection: bool = False  # SMES with projection=True (AdamP/SGDP, SPEC §4)
    clip: float | None = None  # clipped steps: clip_grad_norm_ + AdamW vs SMES(max_grad_norm)
    smes_state: torch.dtype | None = None  # SMES's state dtype (None: the params')
    stochastic_rounding: bool = False  # also each SMES backend with stochastic_rounding=True

    @property
    def rounds(self) -> int:
        """Timing rounds in the whole run (for a progress bar)."""
        return len(self.sets) * len(self.exponents) * (self.warmup + self.repeats)


@dataclasses.dataclass
class _Ready:
    spec: Spec
    step: Step
    state: StateFn
    state_bytes: int
    peak_bytes: int
    first_step_s: float


def run(
    config: Config,
    on_round: Callable[[], None] = lambda: None,
    on_cell: Callable[[str], None] = lambda desc: None,
    on_skip: Callable[[str], None] = print,
) -> list[dict]:
    _prime(config)
    rows: list[dict] = []
    for shape_set in config.sets:
        params = _allocate(shape_set, config.device, config.dtype)
        n_all = sum(p.numel() for p in params) or 1
        projected = sum(p.numel() for p in params if p.dim() > 1) / n_all
        for exponent in config.exponents:
            on_cell(f"{shape_set.name} p={exponent:g}")
            # The other AdamWs do not depend on p and are slow (or slow to compile): they run
            # in the first cell of each set only.
            first = exponent == config.exponents[0]
            cell = specs(
                config.device,
                exponent,
                config.backends,
                unfused_adamw=first,
                compile=config.compile and first,
                dtype=config.dtype,
                projection=config.projection,
                projected=projected,
                clip=config.clip,
                smes_state=config.smes_state,
                stochastic_rounding=config.stochastic_rounding,
            )
            ready = []
            for spec in cell:
                try:
                    ready.append(_set_up(spec, params, config.device))
                except Exception as e:  # report, and benchmark the others
                    on_skip(f"{shape_set.name} p={exponent:g} {spec.name}: skipped, {e!r}")
            _share_state(ready)
            times = interleaved(
                [r.step for r in ready],
                warmup=config.warmup,
                repeats=config.repeats,
                device=config.device,
                on_round=on_round,
            )
            rows += _rows(config, shape_set, exponent, ready, times)
            del ready
            gc.collect()
        del params
        gc.collect()
    return rows


def _prime(config: Config) -> None:
    """One step of each competitor on a tiny tensor, so that one-time initialisation (thread
    pools, lazy imports, the extension's loading) is not billed to the first one measured."""
    params = _allocate(ShapeSet("prime", ((64,),), ""), config.device, config.dtype)
    cell = specs(
        config.device,
        config.exponents[0],
        config.backends,
        unfused_adamw=True,
        compile=False,
        dtype=config.dtype,
        projection=config.projection,
    )
    for spec in cell:
        try:
            spec.build(params)[0]()
        except Exception:
            pass  # reported when the competitor is set up for real


def _allocate(
    shape_set: ShapeSet, device: torch.device, dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    """Parameters with random gradients, filled once (no backward is timed)."""
    torch.manual_seed(0)
    params = []
    for shape in shape_set.shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype))
        p.grad = torch.randn(shape, device=device, dtype=dtype)
        params.append(p)
    return params


def _set_up(spec: Spec, params: list[Tensor], device: torch.device) -> _Ready:
    """Build the competitor and take its first step (state allocation, compilation)."""
    with peak_memory(device) as peak:
        t0 = time.perf_counter()
        step, state = spec.build(params)
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_step_s = time.perf_counter() - t0
    state_bytes = sum(t.numel() * t.element_size() for t in state().values())
    return _Ready(spec, step, state, state_bytes, peak[0], first_step_s)


@torch.no_grad()
def _share_state(ready: list[_Ready]) -> None:
    """Point the state tensors of every competitor of a cell at one set of buffers, one per
    (param, role): the first competitor's that has it. So all competitors read and write the
    same memory.

    Params and grads are shared already; without this each optimizer would stream its own
    exp_avg/exp_avg_sq allocation, and where an allocation lands alone moves the bandwidth of a
    memory-bound step by up to ~7% on this project's VM (the same roofline kernel on four buffer
    sets in one process: 9.13 to 9.74 ms). Roles are kept (an exp_avg_sq only ever shares with
    exp_avg_sqs, which every competitor keeps >= 0); step counts stay separate. Called after the
    first steps, so the state and peak-memory columns are each competitor's own."""

    def layout(t: Tensor) -> tuple:
        return t.shape, t.dtype, t.device, t.stride()

    pool: dict[tuple[int, str], Tensor] = {}
    for r in ready:
        for key, t in r.state().items():
            if key[1] == "step":
                continue
            shared = pool.setdefault(key, t)
            if shared is not t and layout(shared) == layout(t):
                t.set_(shared)


def _rows(
    config: Config,
    shape_set: ShapeSet,
    exponent: float,
    ready: list[_Ready],
    times: list[list[float]],
) -> list[dict]:
    n = shape_set.n_params
    by_name = {r.spec.name: t for r, t in zip(ready, times, strict=True)}
    reference = by_name.get(REFERENCE)
    roof = next((r.spec for r in ready if r.spec.name.startswith("roofline")), None)
    roof_gbps = roof.bytes_per_param * n / statistics.median(by_name[roof.name]) if roof else 0
    method = peak_memory_method(config.device)
    load = load_average()
    rows = []
    for r, t in zip(ready, times, strict=True):
        median = statistics.median(t)
        # inclusive: within the data (the default extrapolates: negative q1 at 2 repeats)
        q1, _, q3 = (
            statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else (median,) * 3
        )
        gbps = r.spec.bytes_per_param * n / median
        # Per-round ratios of side-by-side steps, then their median.
        speedup = (
            statistics.median(a / b for a, b in zip(reference, t, strict=True))
            if reference
            else math.nan
        )
        rows.append(
            {
                "shape_set": shape_set.name,
                "param_dtype": str(config.dtype).replace("torch.", ""),
                "projection": config.projection,
                "clip": "" if config.clip is None else config.clip,
                "smes_state_dtype": str(config.smes_state or config.dtype).replace("torch.", ""),
                "set_source": shape_set.source,
                "n_params": n,
                "n_tensors": shape_set.n_tensors,
                "exponent": exponent,
                "competitor": r.spec.name,
                "bytes_per_param": r.spec.bytes_per_param,
                "ms_per_step": 1e3 * median,
                "ms_q1": 1e3 * q1,
                "ms_q3": 1e3 * q3,
                "params_per_s": n / median,
                "gb_per_s": gbps / 1e9,
                "pct_of_roofline": 100 * gbps / roof_gbps if roof_gbps else math.nan,
                "roofline": roof.name if roof else "none",
                "speedup_vs_fused_adamw": speedup,
                "state_bytes": r.state_bytes,
                "peak_mem_bytes": r.peak_bytes,
                "peak_mem_method": method,
                "first_step_s": r.first_step_s,
                "load_avg_1m": load,
                "warmup": config.warmup,
                "repeats": config.repeats,
            }
        )
    return rows
