"""``"cpu"`` and ``"cuda"``: the compiled multi-tensor kernels of ``smes_fused._C`` (csrc/).

One call of ``torch.ops.smes_fused.smes_step_`` applies a whole bucket, across param groups and
variants: on CPU in one parallel region (AVX-512, AVX2 or SSE2 kernels chosen at run time), on
CUDA in one launch per variant present (usually one). Each tensor's hyperparameters come from a
float64 table that is refilled only when they change. Step counts, ``lr`` tensors,
``grad_scale`` and ``found_inf`` are read where the tensors live: no host sync on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ops
from .._bucket import P_GENERAL, P_HALF, Bucket, BucketKey, Hyper, traced_scalar
from . import get, register

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SEED = _ops.HYPER_COLUMNS.index("rounding_seed")
_EXPONENT = _ops.HYPER_COLUMNS.index("exponent")


def _device_lr(h: Hyper, device_type: str) -> bool:
    """Whether the kernel reads this tensor's lr from a tensor (else from the table). Under
    torch.compile a float lr is passed as a tensor too, so that the table, and the graph's
    guards, do not depend on its value (a scheduler changes it every step)."""
    if isinstance(h.lr, Tensor):
        return h.lr.device.type == device_type
    return torch.compiler.is_compiling()


def hyper_row(h: Hyper, device_type: str = "cpu") -> tuple:
    """One row of the kernel's float64 hyperparameter table (columns: _ops.HYPER_COLUMNS).

    A tensor lr on the kernel's device type is read by the kernel (the row holds 0); any other
    tensor lr is read here (a CPU tensor: no device sync).
    """
    flags = (
        (_ops.FLAG_BIAS_CORRECTION if h.bias_correction else 0)
        | (_ops.FLAG_DECOUPLED if h.decoupled else 0)
        | (_ops.FLAG_AMSGRAD if h.amsgrad else 0)
        | (_ops.FLAG_MAXIMIZE if h.maximize else 0)
        | (_ops.FLAG_TRACK_V if h.track_v else 0)
        | (_ops.FLAG_RECTIFY if h.rectify else 0)
        | (_ops.FLAG_SUM_V if h.second_moment_sum else 0)
        | (_ops.FLAG_PROJECTION if h.projection else 0)
        | (_ops.FLAG_SR if h.stochastic_rounding else 0)
    )
    lr = 0.0 if _device_lr(h, device_type) else float(h.lr)
    p = h.exponent
    if torch.compiler.is_compiling():
        # the class's value (0 or 0.5: the guards pin p there), or 0.0 where the graph writes p
        # (_traced_exponent); the symbolic p itself in a Python row would specialise the graph
        p = 0.5 if h.variant.p_class == P_HALF else 0.0
    return (lr, h.beta1, h.beta2, h.eps, p, h.weight_decay, float(flags),
            h.projection_delta, h.projection_wd_ratio, float(h.rounding_seed))  # fmt: skip


def _traced_exponent(h: Hyper) -> bool:
    """Whether the graph writes this row's exponent into the table (HyperTable.update_runs):
    under torch.compile, at general p, so that neither the table's key nor the guards depend on
    its value (an exponent schedule changes it every step)."""
    return torch.compiler.is_compiling() and h.variant.p_class == P_GENERAL


class HyperTable:
    """The per-tensor hyperparameter table, kept between steps.

    Consecutive tensors usually share one Hyper object (one per param group), so the table is
    described by runs of (count, row); it is refilled in place only when that description or the
    tensors' rounding salts (``Bucket.salts``: the seed column is each tensor's own) change (an
    lr schedule), and reallocated only when the number of tensors changes.
    """

    def __init__(self, device_type: str = "cpu") -> None:
        self.device_type = device_type
        self._key: tuple | None = None
        self.table: Tensor | None = None
        self.lrs: list = []

    def update(
        self, hypers: list[Hyper], device: torch.device | None = None, salts: list[int] = ()
    ) -> Tensor:
        runs: list = []
        prev = None
        count = 0
        tensor_lr = False
        for h in hypers:
            if h is prev:
                count += 1
                continue
            if prev is not None:
                runs.append((count, prev))
            prev, count = h, 1
            tensor_lr = tensor_lr or _device_lr(h, self.device_type)
        if prev is not None:
            runs.append((count, prev))
        self.update_runs(runs, salts)
        self.lrs = self._lrs(hypers, device or torch.device(self.device_type)) if tensor_lr else []
        return self.table

    def update_runs(self, runs: list[tuple[int, Hyper]], salts: list[int] = ()) -> Tensor:
        """The table of consecutive runs of (count, hyper), each tensor's seed XOR its salt
        where ``salts`` has any; ``lrs`` is left to the caller."""
        traced = [_traced_exponent(h) for _, h in runs]
        # (a row whose exponent the graph writes never has the key of one that holds it)
        key = tuple(
            (count, hyper_row(h, self.device_type), t) for (count, h), t in zip(runs, traced)
        )
        salted = any(salts)
        if salted:
            key += (tuple(salts),)
        if key != self._key or self.table is None:
            n = sum(count for count, _ in runs)
            if self.table is None or self.table.shape[0] != n:
                self.table = torch.empty((n, len(_ops.HYPER_COLUMNS)), dtype=torch.float64)
            view = self.table.numpy()
            start = 0
            for cnt, row, _ in key[: len(runs)]:
                view[start : start + cnt] = row
                start += cnt
            if salted:  # (Python ints: torch.compile traces numpy calls as tensor ops)
                hs = [h for count, h in runs for _ in range(count)]
                view[:, _SEED] = [h.rounding_seed ^ s for h, s in zip(hs, salts)]
            self._key = key
        if any(traced):
            start = 0
            for (count, h), t in zip(runs, traced):
                if t:
                    self.table[start : start + count, _EXPONENT] = traced_scalar(h.exponent)
                start += count
        self.lrs = []
        return self.table

    def _lrs(self, hypers: list[Hyper], device: torch.device) -> list:
        out = []
        made: dict[int, Tensor] = {}  # one tensor per param group under torch.compile
        for h in hypers:
            lr = h.lr if _device_lr(h, self.device_type) else None
            if lr is not None and not isinstance(lr, Tensor):
                lr = made.get(id(h))
                if lr is None:
                    lr = made[id(h)] = traced_scalar(h.lr, device)
            # The CUDA kernel reads a float32/float64/bf16/fp16 lr in place (no cast per step).
            out.append(lr)
        return out


def _why_no_cuda_kernels() -> str:
    """Which of setup.py's conditions for building the CUDA kernels fails in this environment,
    and what to do about it."""
    head = "smes_fused._C was built without its CUDA kernels: "
    if not torch.version.cuda:
        return head + (
            f"this torch ({torch.__version__}) is a CPU-only build, so no rebuild can add them; "
            "install a CUDA build of torch, then rebuild with "
            f"`{_ops.BUILD_COMMAND}` (nvcc must be installed)"
        )
    import os

    if os.environ.get("SMES_BUILD_CUDA", "1") == "0":
        return head + f"SMES_BUILD_CUDA=0 is set; unset it and rebuild with `{_ops.BUILD_COMMAND}`"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return head + (
            "nvcc was not found (CUDA_HOME is unset and no nvcc is on PATH); install the CUDA "
            f"toolkit matching torch's CUDA {torch.version.cuda}, set CUDA_HOME, then rebuild "
            f"with `{_ops.BUILD_COMMAND}`"
        )
    return head + (
        f"torch is a CUDA build and nvcc is at {CUDA_HOME}, so it was built before they were "
        f"installed: rebuild with `{_ops.BUILD_COMMAND}`"
    )


class CompiledBackend:
    """The op's CPU or CUDA implementation, for buckets of that device type."""

    # The op reads and advances the step counts where the params live.
    steps_on_device = True

    def __init__(self, device_type: str) -> None:
        self.name = device_type
        self._tables: dict = {}

    def unavailable(self) -> str | None:
        why = _ops.unavailable_reason()
        if why is None and self.name == "cuda" and not _ops.has_cuda_kernels():
            why = _why_no_cuda_kernels()
        if why is None and self.name == "cuda" and not torch.cuda.is_available():
            why = "no CUDA device is visible (torch.cuda.is_available() is False)"
        return why

    def check_ready(self) -> None:
        """Raise what this backend would raise before it writes anything, so that
        ``functional.apply`` hears it before any bucket is stepped: on CPU an ``SMES_CPU_ISA``
        that names no kernel set (the op itself refuses it only for its own bucket)."""
        if self.name == "cpu":
            _ops.cpu_isa()

    def cannot_run(self, key: BucketKey) -> str | None:
        if key.device.type != self.name:
            return (
                f"the {self.name} backend runs {self.name.upper()} tensors only, not {key.device}"
            )
        if key.param_dtype not in _PARAM_DTYPES:
            return f"params of dtype {key.param_dtype} (supported: float32, bfloat16, float16)"
        if key.state_dtype not in (torch.float32, key.param_dtype):
            return f"state dtype {key.state_dtype} (supported: float32 or the param dtype)"
        return None

    def fast_bucket(self, bucket: Bucket, runs: list[tuple[int, int]]) -> FastBucket | None:
        """The bucket kept in C++ for steady-state steps (CPU only, one state kind), or None.

        ``runs`` are (count, group index) for the bucket's tensors in order."""
        if self.name != "cpu" or len(bucket) == 0 or len(bucket.by_state_kind()) != 1:
            return None
        v = bucket.exp_avg_sqs if bucket.exp_avg_sqs[0] is not None else []
        x = bucket.max_exp_avg_sqs if bucket.max_exp_avg_sqs[0] is not None else []
        handle = _ops._C.plan_new(bucket.params, bucket.exp_avgs, v, x, bucket.steps)
        return None if handle is NotImplemented else FastBucket(handle, runs, bucket.salts)

    def __call__(self, bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
        if len(bucket) == 0:
            return
        # The op takes exp_avg_sqs / max_exp_avg_sqs as a full list or an empty one, never a list
        # with None in it (torch.compile's functionalization of mutable Tensor?[] arguments fails
        # on None). A bucket that mixes tensors with and without v (or v_max) is applied in one
        # call per kind: rare, since it needs groups that differ in p = 0 or amsgrad.
        kinds = bucket.by_state_kind()
        if len(kinds) == 1:
            self._apply(bucket, bucket.key, grad_scale, found_inf)
        else:
            for kind, index in sorted(kinds.items()):
                self._apply(bucket.subset(index), (bucket.key, kind), grad_scale, found_inf)

    def _apply(self, bucket: Bucket, table_key, grad_scale, found_inf) -> None:
        tab = self._tables.get(table_key)
        if tab is None:
            tab = self._tables[table_key] = HyperTable(self.name)
        hypers = tab.update(bucket.hypers, bucket.key.device, bucket.salts)
        v = bucket.exp_avg_sqs if bucket.exp_avg_sqs[0] is not None else []
        x = bucket.max_exp_avg_sqs if bucket.max_exp_avg_sqs[0] is not None else []
        try:
            _ops.smes_step_(
                bucket.params,
                bucket.grads,
                bucket.exp_avgs,
                v,
                x,
                bucket.steps,
                hypers,
                tab.lrs,
                grad_scale,
                found_inf,
            )
        except RuntimeError as e:
            # Strided or mixed layouts the flat kernels cannot walk (checked before any write):
            # apply the bucket with the per-tensor reference path instead.
            if "smes_fused: layout" not in str(e):
                raise
            get("reference")(bucket, grad_scale=grad_scale, found_inf=found_inf)


class FastBucket:
    """A "cpu" bucket whose params and state are kept in C++ between steps (``_C.plan_step``):
    a step passes the hyperparameter table, and the C++ reads every param's ``.grad`` itself,
    with no Python per tensor. Anything unusual (a missing or sparse grad, a tensor lr, a
    layout the flat kernel cannot walk, a dispatch mode) makes it decline, having changed
    nothing, and the optimizer takes its general path."""

    def __init__(self, handle, runs: list[tuple[int, int]], salts: list[int]) -> None:
        self.handle = handle
        self.runs = runs
        self.salts = salts if any(salts) else ()  # (checked once, not per step)
        self.table = HyperTable("cpu")

    def __call__(self, hypers: list[Hyper], *, grad_scale=None, found_inf=None) -> bool:
        """One step with the param groups' ``hypers``; False if it declined."""
        if self.handle is None:
            return False
        runs = [(count, hypers[gi]) for count, gi in self.runs]
        if any(isinstance(h.lr, Tensor) for _, h in runs):
            return False
        table = self.table.update_runs(runs, self.salts)
        if grad_scale is not None:
            grad_scale = grad_scale.to("cpu", torch.float32)
        if found_inf is not None:
            found_inf = found_inf.to("cpu", torch.float32)
        try:
            done = _ops._C.plan_step(self.handle, table, grad_scale, found_inf)
        except RuntimeError as e:
            if "smes_fused: layout" not in str(e):
                raise
            self.handle = None  # the general path applies this bucket per tensor, every step
            return False
        return done is not NotImplemented


register(CompiledBackend("cpu"))
register(CompiledBackend("cuda"))
