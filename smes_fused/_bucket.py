"""Buckets: the unit of work every backend applies in one go.

A bucket holds every tensor of the optimizer that shares (device, param dtype, state dtype),
across all param groups. Hyperparameters travel per tensor (`Bucket.hypers[i]`), so param groups
never split a bucket. The structural switches that change memory traffic (exponent class,
whether ``v`` is tracked, weight-decay mode, amsgrad, maximize, projection) form a
:class:`Variant`; fused
backends compile one kernel per variant and may launch once per variant present in a bucket
(usually one).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

# Exponent classes: the only values of p that may be compile-time switches (SPEC §3).
P_ZERO = 0  # D = 1 + eps: v is neither read nor written for the denominator
P_HALF = 1  # D = sqrt(v)/sqrt(bc2) + eps, in torch.optim.AdamW's order
P_GENERAL = 2  # D = exp2(p * log2(v / bc2)) + eps


def exponent_class(p: float) -> int:
    if p == 0.0:
        return P_ZERO
    if p == 0.5:
        return P_HALF
    return P_GENERAL


class Variant(NamedTuple):
    """Compile-time switches of one kernel instance."""

    p_class: int  # P_ZERO, P_HALF or P_GENERAL
    track_v: bool  # v (exp_avg_sq) is read and written
    decoupled: bool  # decoupled (AdamW) weight decay, else L2 added to the gradient
    amsgrad: bool  # v_max tracked and used (only when track_v)
    maximize: bool
    projection: bool  # AdamP/SGDP: a row-statistics pass before the update (SPEC §4)
    stochastic_rounding: bool = False  # bf16 params: θ stochastically rounded (SPEC §4)


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The hyperparameters of one param group, as one tensor of a bucket sees them."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    exponent: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool
    maximize: bool
    bias_correction: bool
    track_v: bool
    # SPEC §4 extensions (defaults: plain SMES).
    projection: bool = False
    projection_delta: float = 0.1
    projection_wd_ratio: float = 0.1
    rectify: bool = False
    second_moment_sum: bool = False  # AdaGrad: v ← v + g², no bc2
    stochastic_rounding: bool = False  # bf16 params: unbiased rounding of the new θ
    rounding_seed: int = 0

    @property
    def variant(self) -> Variant:
        return Variant(
            exponent_class(self.exponent),
            self.track_v,
            self.decoupled,
            self.amsgrad and self.track_v,
            self.maximize,
            self.projection,
            self.stochastic_rounding,
        )


class BucketKey(NamedTuple):
    device: torch.device
    param_dtype: torch.dtype
    state_dtype: torch.dtype


@dataclasses.dataclass
class Bucket:
    """Parallel lists, one entry per parameter that has a gradient this step.

    ``exp_avg_sqs[i]`` is None where ``v`` is not tracked; ``max_exp_avg_sqs[i]`` is None unless
    amsgrad is on for a tracked tensor. ``steps[i]`` is the float32 scalar count of the steps
    taken so far; the backend advances it by one, unless ``found_inf`` is non-zero (then nothing
    changes at all).

    :meth:`by_variant` and :meth:`by_state_kind` are computed once and kept until the next
    :meth:`append`. Between steps the optimizer replaces ``grads`` and ``hypers`` only, with
    hyperparameters of the same variants (a change of variant rebuilds the buckets).
    """

    key: BucketKey
    params: list[Tensor] = dataclasses.field(default_factory=list)
    grads: list[Tensor] = dataclasses.field(default_factory=list)
    exp_avgs: list[Tensor] = dataclasses.field(default_factory=list)
    exp_avg_sqs: list[Tensor | None] = dataclasses.field(default_factory=list)
    max_exp_avg_sqs: list[Tensor | None] = dataclasses.field(default_factory=list)
    steps: list[Tensor] = dataclasses.field(default_factory=list)
    hypers: list[Hyper] = dataclasses.field(default_factory=list)
    # each tensor's rounding seed is its hyper's XOR its salt (_rounding.tensor_salt; 0 where it
    # is not rounded stochastically); fixed while the bucket lives
    salts: list[int] = dataclasses.field(default_factory=list)
    _by_variant: dict | None = dataclasses.field(default=None, repr=False, compare=False)
    _by_state_kind: dict | None = dataclasses.field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.params)

    def append(self, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, hyper, salt=0):
        self.params.append(param)
        self.grads.append(grad)
        self.exp_avgs.append(exp_avg)
        self.exp_avg_sqs.append(exp_avg_sq)
        self.max_exp_avg_sqs.append(max_exp_avg_sq)
        self.steps.append(step)
        self.hypers.append(hyper)
        self.salts.append(salt)
        self._by_variant = self._by_state_kind = None

    def subset(self, index: list[int]) -> Bucket:
        b = Bucket(self.key)
        for i in index:
            b.append(
                self.params[i],
                self.grads[i],
                self.exp_avgs[i],
                self.exp_avg_sqs[i],
                self.max_exp_avg_sqs[i],
                self.steps[i],
                self.hypers[i],
                self.salts[i],
            )
        return b

    def seeds(self) -> list[int]:
        """Each tensor's rounding seed."""
        return [h.rounding_seed ^ s for h, s in zip(self.hypers, self.salts)]

    def check_state(self) -> None:
        """Every state tensor of a bucket against its param, before anything is written: the
        same shape and device as the param, strided, the bucket's state dtype (exp_avg_sq and
        max_exp_avg_sq that of exp_avg, as the fused kernels require), and a 1-element floating
        step. ``functional.apply`` calls it for every bucket of a step before it steps any (a
        backend may launch a bucket in parts: per state kind, per variant). Without it a param
        resized through ``.data`` failed half-way through a step with a broadcast error, and an
        integer state was truncated to 0."""
        from . import _ops

        names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        lists = (self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs)
        sdt = self.key.state_dtype
        for name, ts in zip(names, lists):
            i = _ops.first_misfit(self.params, ts, sdt)
            if i is not None:
                p, t = self.params[i], ts[i]
                hint = " (was the param resized through .data?)" if t.shape != p.shape else ""
                raise ValueError(
                    f"{name} of the param of shape {tuple(p.shape)} on {p.device} (tensor "
                    f"{i} of its bucket) has shape {tuple(t.shape)}, dtype {t.dtype} on "
                    f"{t.device}; optimizer state must have its param's shape and device "
                    f"and the dtype of its exp_avg ({sdt}){hint}"
                )
        i = _ops.first_bad_step(self.steps)
        if i is not None:
            p, s = self.params[i], self.steps[i]
            raise ValueError(
                f"step of the param of shape {tuple(p.shape)} (tensor {i} of its bucket): "
                f"expected a 1-element floating tensor, got shape {tuple(s.shape)}, {s.dtype}"
            )

    def by_variant(self) -> dict[Variant, list[int]]:
        """Tensor indices per compile-time variant, in bucket order."""
        if self._by_variant is None:
            out: dict[Variant, list[int]] = {}
            for i, h in enumerate(self.hypers):
                out.setdefault(h.variant, []).append(i)
            self._by_variant = out
        return self._by_variant

    def by_state_kind(self) -> dict[tuple[bool, bool], list[int]]:
        """Tensor indices per (has exp_avg_sq, has max_exp_avg_sq), in bucket order."""
        if self._by_state_kind is None:
            out: dict[tuple[bool, bool], list[int]] = {}
            for i, (v, x) in enumerate(zip(self.exp_avg_sqs, self.max_exp_avg_sqs)):
                out.setdefault((v is not None, x is not None), []).append(i)
            self._by_state_kind = out
        return self._by_state_kind


def unfit_state_dtype(key: BucketKey) -> str | None:
    """Why no backend runs this bucket's state dtype, or None (an integer state would be
    truncated: refused when backends are chosen, before any bucket is written)."""
    if not key.state_dtype.is_floating_point:
        return f"state dtype {key.state_dtype} (optimizer state must be floating point)"
    return None


def traced_scalar(x, device=None):
    """``x`` (a Python number) as torch.compile should see it: while tracing, a 0-d float64
    tensor that the graph computes (ones * x), which inductor keeps symbolic, where a Python
    scalar (passed to a foreach op, ``**``, ``torch.full``, ``torch.tensor``, a float argument of
    an op, a numpy write) would specialise the graph on a float that a schedule changes every
    step (lr, exponent): a recompile per step. Otherwise ``x`` itself."""
    if not torch.compiler.is_compiling():
        return x
    return torch.ones((), dtype=torch.float64, device=device) * x


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math dtype: float32 for 16/32-bit storage, float64 for float64 storage."""
    return torch.float64 if dtype == torch.float64 else torch.float32
