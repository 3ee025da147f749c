"""Exponent schedules: set ``group["exponent"]`` each step, as an lr scheduler sets ``group["lr"]``.

The balance coefficient p of SMES need not stay fixed: warming up from AdamW (p = 0.5) to a
small or negative p, annealing it, or cycling it between two values are settings the paper's
follow-up explores. The classes here change only ``group["exponent"]``, so they run next to any
``torch.optim.lr_scheduler`` on the same optimizer (each writes its own key)::

    opt = SMES(model.parameters(), lr=3e-3, exponent=0.5)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    p_sched = LinearExponent(opt, start=0.5, end=-0.08, total_steps=200)
    for batch in data:
        loss_fn(model(batch)).backward()
        opt.step()
        opt.zero_grad()
        lr_sched.step()
        p_sched.step()

Like ``torch.optim.lr_scheduler.LRScheduler``: ``last_epoch`` counts the calls of ``step()``;
construction calls it once (``last_epoch`` 0) and writes the schedule's first value into the
groups; ``get_last_exponent()`` returns the values last written, one per group;
``state_dict()`` / ``load_state_dict()`` save and restore everything but the optimizer, and a
schedule restored mid-way continues exactly as the saved one would have. Values are closed forms
of ``last_epoch`` (below), never a recursion, so they do not drift.

``start`` and ``end`` are numbers, or lists with one entry per param group; ``None`` (alone or
as an entry) means the group's exponent when the schedule was made, kept in the group as
``"initial_exponent"`` (as LR schedulers keep ``"initial_lr"``). Every value a schedule can write
lies between its group's ``start`` and ``end``, so both are checked against the group at
construction, with the optimizer's own rules (SPEC §5): a non-finite value, ``p > 0`` in a group
with ``eps == 0``, or a non-zero p in a group made with ``exponent=0`` and without
``track_second_moment=True`` (it keeps no ``exp_avg_sq``) raises a ValueError there, not at a
later step.

Changing p costs no recompilation and no reallocation (SPEC §3): p is a runtime value of the
kernels. Only the exact values 0 and 0.5 select other compile-time variants (each compiled once,
and a step at such a value rebuilds the optimizer's cached plan once per change of class), so a
schedule that merely passes near them stays on the general kernel.

:func:`depth_param_groups` gives each layer its own exponent, linear in depth.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

__all__ = [
    "ExponentScheduler",
    "LinearExponent",
    "CosineExponent",
    "CyclicExponent",
    "depth_param_groups",
]


def _real(what: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"Invalid {what}: {x!r}; expected a real number")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"Invalid {what}: {x}; expected a finite number")
    return x


def _count(what: str, x, least: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < least:
        raise ValueError(f"Invalid {what}: {x!r}; expected an integer >= {least}")
    return int(x)


class ExponentScheduler:
    """Base class: a schedule of ``group["exponent"]`` between ``start`` and ``end`` per group.

    Subclasses implement :meth:`exponent_at`, the closed form of the schedule at step ``t``
    (``last_epoch``) for one group. See the module docstring for the shared behaviour.
    """

    _COUNTS: dict[str, int] = {}  # a subclass's integer settings and their least values

    def __init__(self, optimizer, start=None, end=None, last_epoch: int = -1) -> None:
        from .optimizer import SMES

        if not isinstance(optimizer, SMES):
            raise TypeError(
                f"{type(self).__name__} schedules the exponent of an SMES optimizer, got "
                f"{type(optimizer).__name__}"
            )
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, numbers.Integral):
            raise TypeError(f"Invalid last_epoch: {last_epoch!r}; expected an integer")
        if last_epoch < -1:
            raise ValueError(f"Invalid last_epoch: {last_epoch}; expected -1 or a step count")
        self.optimizer = optimizer
        groups = optimizer.param_groups
        if last_epoch == -1:
            initial = [g.get("initial_exponent", g["exponent"]) for g in groups]
        else:  # resumed: the optimizer's loaded groups hold them
            initial = [g.get("initial_exponent") for g in groups]
        starts = self._per_group("start", start, initial)
        ends = self._per_group("end", end, initial)
        self._check_range(starts, ends)
        # Validated: from here on the groups are written.
        for group, p in zip(groups, initial):
            if p is not None:
                group.setdefault("initial_exponent", p)
        self.start_exponents, self.end_exponents = starts, ends
        self.last_epoch = int(last_epoch)
        self._last_exponent: list[float] = []
        self.step()

    # ---------------------------------------------------------------- the schedule

    def exponent_at(self, t: int, start: float, end: float) -> float:
        """The exponent at step ``t`` (``last_epoch``) of a group scheduled from start to end."""
        raise NotImplementedError

    def step(self) -> None:
        """Advance ``last_epoch`` by one and write the exponents of that step into the groups.

        Call it once per optimizer step, after ``optimizer.step()`` (as an lr scheduler)."""
        self.last_epoch += 1
        values = [
            self.exponent_at(self.last_epoch, s, e)
            for s, e in zip(self.start_exponents, self.end_exponents)
        ]
        for group, p in zip(self.optimizer.param_groups, values):
            group["exponent"] = p
        self._last_exponent = values

    def get_last_exponent(self) -> list[float]:
        """The exponents the last :meth:`step` (or construction) wrote, one per param group."""
        return list(self._last_exponent)

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Everything but the optimizer, as ``torch.optim.lr_scheduler`` saves it."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a saved schedule and write its current exponents into the groups, so that the
        order of this call and the optimizer's ``load_state_dict`` does not matter. A state that
        does not fit this optimizer (another group count, endpoints a group cannot take) raises
        before anything changes."""
        need = sorted(self.state_dict())
        if not isinstance(state_dict, dict) or sorted(state_dict) != need:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"not a {type(self).__name__} state dict: expected a dict with the keys {need}, "
                f"got {got}"
            )
        last = state_dict["last_epoch"]
        if isinstance(last, bool) or not isinstance(last, numbers.Integral) or last < -1:
            raise ValueError(f"Invalid last_epoch: {last!r}; expected an integer >= -1")
        for k, least in self._COUNTS.items():  # total_steps, period: as the constructor checks
            _count(k, state_dict[k], least)
        n = len(self.optimizer.param_groups)
        for k in ("start_exponents", "end_exponents", "_last_exponent"):
            if len(state_dict[k]) != n:
                raise ValueError(
                    f"the loaded schedule has {len(state_dict[k])} {k}, this optimizer has {n} "
                    "param groups"
                )
        self._check_range(
            state_dict["start_exponents"],
            state_dict["end_exponents"],
            state_dict["_last_exponent"],  # written into the groups: a NaN there broke step()
        )
        self.__dict__.update(state_dict)
        for group, p in zip(self.optimizer.param_groups, self._last_exponent):
            group["exponent"] = p

    # ---------------------------------------------------------------- validation

    def _per_group(self, what: str, value, initial: list) -> list[float]:
        groups = self.optimizer.param_groups
        if value is None or isinstance(value, numbers.Real):
            values = [value] * len(groups)
        elif isinstance(value, Sequence) and not isinstance(value, str):
            values = list(value)
            if len(values) != len(groups):
                raise ValueError(
                    f"{type(self).__name__}: {what} has {len(values)} entries, the optimizer has "
                    f"{len(groups)} param groups; give one value per group or a single number"
                )
        else:
            raise TypeError(
                f"{type(self).__name__}: Invalid {what}: {value!r}; expected a number, None or a "
                "list with one per param group"
            )
        out = []
        for i, v in enumerate(values):
            if v is None:
                v = initial[i]
                if v is None:
                    raise KeyError(
                        f"param group {i} has no 'initial_exponent': a schedule resumed with "
                        f"last_epoch >= 0 and {what}=None needs the optimizer's state dict loaded "
                        "first (it holds the initial exponents), or an explicit value"
                    )
            out.append(_real(f"{what} exponent of param group {i}", v))
        return out

    def _check_range(self, starts, ends, currents=None) -> None:
        """Both endpoints of every group (and a loaded current value) through the optimizer's
        group checks: the values in between break a rule (p > 0 with eps = 0, p != 0 without v)
        only if an endpoint does."""
        from .optimizer import _group_hyper

        currents = currents if currents is not None else starts
        groups = self.optimizer.param_groups
        for i, (group, s, e, c) in enumerate(zip(groups, starts, ends, currents)):
            for what, p in (("start", s), ("end", e), ("current", c)):
                p = _real(f"{what} exponent of param group {i}", p)
                try:
                    _group_hyper({**group, "exponent": p})
                except (ValueError, TypeError) as err:
                    raise ValueError(
                        f"{type(self).__name__}: param group {i} cannot take the exponent {p} "
                        f"(the schedule's {what}): {err}"
                    ) from None


class LinearExponent(ExponentScheduler):
    r"""Linear from ``start`` to ``end`` over ``total_steps`` steps, then ``end``.

    .. math:: p(t) = \text{start} + (\text{end} - \text{start}) \cdot t / N \quad (0 < t < N),

    exactly ``start`` at t = 0 and ``end`` from t = N on. A warm-up from AdamW to the paper's
    p: ``LinearExponent(opt, start=0.5, end=-0.08, total_steps=500)``.
    """

    _COUNTS = {"total_steps": 1}

    def __init__(self, optimizer, start=None, end=None, total_steps: int = 1, last_epoch=-1):
        self.total_steps = _count("total_steps", total_steps, 1)
        super().__init__(optimizer, start, end, last_epoch)

    def exponent_at(self, t: int, start: float, end: float) -> float:
        if t <= 0:
            return start
        if t >= self.total_steps:
            return end
        return start + (end - start) * t / self.total_steps


class CosineExponent(ExponentScheduler):
    r"""Half a cosine from ``start`` to ``end`` over ``total_steps`` steps, then ``end``.

    .. math:: p(t) = \text{end} + (\text{start} - \text{end})
              \cdot \frac{1 + \cos(\pi t / N)}{2} \quad (0 < t < N),

    exactly ``start`` at t = 0 and ``end`` from t = N on (unlike ``CosineAnnealingLR``, it
    does not swing back after N).
    """

    _COUNTS = {"total_steps": 1}

    def __init__(self, optimizer, start=None, end=None, total_steps: int = 1, last_epoch=-1):
        self.total_steps = _count("total_steps", total_steps, 1)
        super().__init__(optimizer, start, end, last_epoch)

    def exponent_at(self, t: int, start: float, end: float) -> float:
        if t <= 0:
            return start
        if t >= self.total_steps:
            return end
        return end + (start - end) * (1.0 + math.cos(math.pi * t / self.total_steps)) / 2.0


class CyclicExponent(ExponentScheduler):
    r"""Triangular cycles between ``start`` and ``end`` with a period of ``period`` steps.

    With :math:`r = t \bmod T` and :math:`u = 2\min(r, T - r) / T` (0 at the start of a cycle,
    1 in its middle):

    .. math:: p(t) = \text{start} + (\text{end} - \text{start}) \cdot u,

    exactly ``start`` where u = 0 and ``end`` where u = 1 (t = T/2 mod T, for an even T). The
    cyclic schedule of the authors' follow-up; ``CyclicLR(mode="triangular")`` for p.
    """

    _COUNTS = {"period": 2}

    def __init__(self, optimizer, start=None, end=None, period: int = 2, last_epoch=-1):
        self.period = _count("period", period, 2)
        super().__init__(optimizer, start, end, last_epoch)

    def exponent_at(self, t: int, start: float, end: float) -> float:
        r = t % self.period
        u = 2 * min(r, self.period - r) / self.period
        if u == 0:
            return start
        if u == 1:
            return end
        return start + (end - start) * u


# -------------------------------------------------------------------- depth-dependent exponents


def _owners(source) -> list[list[Tensor]]:
    """The params in order, split by the module (or name prefix) that owns them; tied params
    once, where they first appear."""
    if isinstance(source, nn.Module):
        units = [list(m.parameters(recurse=False)) for m in source.modules()]
    else:
        if isinstance(source, Tensor):
            raise TypeError("depth_param_groups needs a model or an iterable of parameters")
        by_owner: dict = {}
        plain: list[list[Tensor]] = []
        named = None
        for item in source:
            is_pair = isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            if named is None:
                named = is_pair
            if is_pair != named:
                raise TypeError("give all params as (name, param) pairs, or none of them")
            if is_pair:
                by_owner.setdefault(item[0].rpartition(".")[0], []).append(item[1])
            else:
                plain.append([item])
        units = list(by_owner.values()) if named else plain
    seen: set[int] = set()
    out = []
    for unit in units:
        kept = []
        for p in unit:
            if not isinstance(p, Tensor):
                raise TypeError(f"depth_param_groups got a {type(p).__name__}, not a parameter")
            if id(p) not in seen:
                seen.add(id(p))
                kept.append(p)
        if kept:
            out.append(kept)
    return out


def depth_param_groups(
    model_or_named_params: nn.Module | Iterable, p_input: float, p_output: float, **group_kwargs
) -> list[dict]:
    r"""Param groups whose exponent goes linearly from ``p_input`` (first layer) to
    ``p_output`` (last layer), ready for ``SMES(groups, ...)``.

    The rule. Parameters are taken in the order the model registers them (``model.modules()``,
    which for ``nn.Sequential`` and most models is the order of the forward pass), and grouped by
    the module that owns them directly (for ``(name, param)`` pairs, by the name's prefix before
    the last dot; for bare tensors, each tensor on its own). An owner with a parameter of two or
    more dimensions (a weight matrix, a conv kernel, an embedding) is a *layer*. An owner with
    only 0- or 1-dimensional parameters (a norm, a standalone bias or scale) joins the layer
    before it (BatchNorm after its conv), or the first layer when it comes before any (if no
    owner has a 2-D parameter, each owner is a layer). So biases and norm parameters share their
    layer's depth. With layers k = 0 … L−1:

    .. math:: p_k = p_\text{input} + (p_\text{output} - p_\text{input}) \cdot k / (L - 1),

    exactly ``p_input`` for k = 0 and ``p_output`` for k = L−1 (``p_input`` if L = 1). Each
    layer becomes one param group; ``group_kwargs`` (``lr``, ``weight_decay``,
    ``track_second_moment``, ...) go into every group. A tied parameter belongs to the layer
    where it first appears; frozen parameters are kept, as ``model.parameters()`` keeps them.
    Several groups cost nothing on the fused backends: a bucket spans all groups.
    """
    p_input = _real("p_input", p_input)
    p_output = _real("p_output", p_output)
    for key in ("params", "exponent"):
        if key in group_kwargs:
            raise TypeError(f"depth_param_groups sets {key!r} itself; do not pass it")
    units = _owners(model_or_named_params)
    if not units:
        raise ValueError("depth_param_groups: the model has no parameters")
    is_layer = [any(p.dim() >= 2 for p in unit) for unit in units]
    if not any(is_layer):
        is_layer = [True] * len(units)
    layers: list[list[Tensor]] = []
    leading: list[Tensor] = []  # owners before the first layer
    for unit, layer in zip(units, is_layer):
        if layer:
            layers.append(leading + unit)
            leading = []
        elif layers:
            layers[-1].extend(unit)
        else:
            leading.extend(unit)
    n = len(layers)
    groups = []
    for k, params in enumerate(layers):
        if k == 0:
            p = p_input
        elif k == n - 1:
            p = p_output
        else:
            p = p_input + (p_output - p_input) * k / (n - 1)
        groups.append({**group_kwargs, "params": params, "exponent": p})
    return groups
