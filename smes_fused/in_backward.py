"""Optimizer in backward: SMES steps each bucket of parameters as soon as backward has made their
gradients final, and frees those gradients at once.

A usual training step holds every gradient at the end of backward (one more copy of the model)
before ``opt.step()`` reads them. Here a hook (``Tensor.register_post_accumulate_grad_hook``) on
each parameter counts the gradients of its bucket as they become final; when a bucket is
complete, SMES steps its parameters (one fused launch over the bucket) and sets their ``.grad``
to None. So only about one bucket of gradients lives at a time, and the step overlaps backward.

    opt = smes_fused.in_backward.attach(model, lr=3e-3, exponent=-0.08)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    for x, y in data:
        loss_fn(model(x), y).backward()   # the parameters are stepped in here
        opt.step()                        # ends the iteration (steps nothing left to step)
        opt.zero_grad()                   # nothing to clear: every gradient was freed by its step
        sched.step()

Design. :func:`attach` returns an :class:`InBackwardSMES`, an :class:`~smes_fused.SMES` that owns
the param groups and the state, so ``state_dict()`` / ``load_state_dict()`` are SMES's (a
checkpoint loads into a plain SMES, or AdamW at p = 0.5, and back), and lr schedulers and
:mod:`smes_fused.schedules` work on it as on SMES. Buckets hold the parameters in the reverse of
their order in the groups (the order backward usually finishes them, as DDP assumes), up to
``bucket_size_bytes`` of parameter bytes each (at least one parameter), across param groups.
Each bucket is stepped by a worker SMES over just its parameters, which shares the owner's
``state`` and gets the owner's current hyperparameters (lr, exponent, ...) before every step.
The update of every element is the one SMES would make, on every backend; results equal
``loss.backward(); SMES.step()``.

Bucket completion. A bucket is stepped when all its parameters' gradients are final. Those that
get none in a backward (unused in this forward, frozen after :func:`attach`) are stepped by a
callback at the end of that backward (with whatever gradients its bucket has), so after
``backward()`` every gradient is None. ``step()`` steps anything still left: a gradient set by
hand, a parameter frozen at attach time and unfrozen later (it has no hook).

What it cannot do, with the errors it gives:

- **Gradient accumulation** over micro-batches: a parameter is stepped as soon as one backward
  has finished its gradient, so a second backward before ``step()`` would step it again on a
  partial gradient. ``step()`` marks the end of an iteration; a backward that reaches a
  parameter already stepped since the last ``step()`` raises a RuntimeError and drops that
  parameter's new gradient (nothing else of its bucket changes; ``step()`` then ends the
  iteration). Backwards over disjoint parameters (two losses, each backward once) are fine:
  each parameter is stepped once. Accumulate with plain SMES.
- **Global gradient clipping** (``max_grad_norm``): the norm of all gradients is known only
  after the last one, but the first buckets are stepped, and their gradients freed, long before.
  ``attach(..., max_grad_norm=...)`` raises a ValueError, and so do backward and ``step()``
  when ``max_grad_norm`` is set on the optimizer afterwards (before anything is stepped);
  ``clip_grad_norm_`` after backward would see no gradients.
- **Loss scaling** (``torch.amp.GradScaler``): the step happens before the scaler can unscale
  or check for inf, so backward has already stepped the parameters on the scaled gradients
  when ``step()`` is handed ``grad_scale``/``found_inf``; it raises, saying so, and ends the
  iteration (the next one runs). bf16 autocast needs no scaler and works.
- **DDP / FSDP**: their gradient reduction runs after the hook would step. Single process only.
- ``add_param_group`` after :func:`attach`, pickling and ``copy.deepcopy`` (the hooks cannot be
  copied): save ``state_dict()`` instead.

:meth:`InBackwardSMES.detach` removes the hooks; afterwards ``step()`` steps whatever gradients
there are, as SMES does.
"""

from __future__ import annotations

import numbers
import threading
import weakref
from functools import partial

import torch
from torch import Tensor, nn

from .optimizer import SMES, _group_hyper

__all__ = ["attach", "InBackwardSMES", "DEFAULT_BUCKET_BYTES"]

DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


class _Bucket:
    """Parameters stepped together; ``ready[i]``: params[i]'s gradient is final;
    ``stepped[i]``: the iteration params[i] was last stepped in (a param the bucket's step
    found without a gradient was not stepped: another backward of the iteration may still
    reach it)."""

    __slots__ = ("params", "worker", "group_index", "ready", "count", "stepped")

    def __init__(self, params: list[Tensor], worker: SMES, group_index: list[int]) -> None:
        self.params = params
        self.worker = worker
        self.group_index = group_index  # the owner's group index of each worker group
        self.ready = [False] * len(params)
        self.count = 0
        self.stepped = [-1] * len(params)


def _no_clipping(max_grad_norm) -> str:
    return (
        f"max_grad_norm={max_grad_norm!r}: SMES in backward cannot clip by the global "
        "gradient norm. That norm needs every gradient of the step, but each bucket of "
        "parameters is stepped, and its gradients freed, as soon as backward finishes "
        "them, long before the last gradient exists. Clip per parameter in a hook of "
        "your own, or use smes_fused.SMES with torch.nn.utils.clip_grad_norm_"
    )


# id(param) -> (weakref of the param, weakref of the SMES in backward whose hooks it carries):
# attach() refuses a second owner (tensors compare elementwise, so no WeakKeyDictionary)
_ATTACHED: dict[int, tuple] = {}


def _owner(p: Tensor):
    entry = _ATTACHED.get(id(p))
    return entry[1]() if entry is not None and entry[0]() is p else None


def _set_owner(p: Tensor, owner) -> None:
    key = id(p)
    _ATTACHED[key] = (weakref.ref(p, lambda _: _ATTACHED.pop(key, None)), weakref.ref(owner))


def _hook(owner_ref, bucket: int, slot: int, param: Tensor) -> None:
    owner = owner_ref()
    if owner is not None:  # an optimizer that was dropped steps nothing
        owner._on_grad(bucket, slot, param)


class InBackwardSMES(SMES):
    """SMES stepped from backward, one bucket at a time; see the module docstring.
    ``zero_grad()`` is SMES's: after ``step()`` there is nothing left to clear.

    Args:
        params: parameters or param groups, as for :class:`~smes_fused.SMES`.
        bucket_size_bytes: parameter bytes per bucket (default 25 MiB, DDP's); 0 steps each
            parameter alone. Larger buckets are fewer, larger fused launches and hold more
            gradients at once.
        max_grad_norm: only to raise a clear error: global clipping cannot work here.
        **smes_kwargs: everything :class:`~smes_fused.SMES` takes.
    """

    def __init__(
        self,
        params,
        *,
        bucket_size_bytes: int = DEFAULT_BUCKET_BYTES,
        max_grad_norm: float | None = None,
        **smes_kwargs,
    ) -> None:
        if max_grad_norm is not None:
            raise ValueError(_no_clipping(max_grad_norm))
        if smes_kwargs.get("amp_unscale", "step") != "step":
            raise ValueError(
                f"amp_unscale={smes_kwargs['amp_unscale']!r} with SMES in backward: a "
                "torch.amp.GradScaler cannot unscale gradients that backward has already stepped "
                "and freed (its unscale_ finds none, and the iteration never ends); SMES in "
                "backward refuses GradScaler with the reason at step(). Use bf16 autocast (no "
                "loss scaling), or smes_fused.SMES"
            )
        if (
            isinstance(bucket_size_bytes, bool)
            or not isinstance(bucket_size_bytes, numbers.Integral)
            or bucket_size_bytes < 0
        ):
            raise ValueError(
                f"Invalid bucket_size_bytes: {bucket_size_bytes!r}; expected an integer >= 0"
            )
        self._attached = False
        super().__init__(params, **smes_kwargs)
        self.bucket_size_bytes = int(bucket_size_bytes)
        self._iteration = 0
        self._queued = False
        self._lock = threading.Lock()
        self._buckets: list[_Bucket] = []
        self._hooks: list = []
        self._rest: SMES | None = None  # steps gradients no hook saw (see step())
        self._make_buckets()
        self._attached = True

    # ---------------------------------------------------------------- set-up

    def _make_buckets(self) -> None:
        flat = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"]]
        hooked = [(gi, p) for gi, p in reversed(flat) if p.requires_grad]
        for _, p in hooked:  # before any hook is registered
            if _owner(p) is not None:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} is attached to another SMES in "
                    "backward, whose hooks would step it and free its gradient before this "
                    "one saw it: call detach() on the other optimizer first"
                )
        for _, p in hooked:
            _set_owner(p, self)
        ref = weakref.ref(self)
        chunks: list[list[tuple[int, Tensor]]] = []
        size = 0
        for gi, p in hooked:
            nbytes = p.numel() * p.element_size()
            if not chunks or size + nbytes > self.bucket_size_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append((gi, p))
            size += nbytes
        position = {id(p): k for k, (_, p) in enumerate(flat)}
        for bi, chunk in enumerate(chunks):
            by_group: dict[int, list[Tensor]] = {}
            for gi, p in chunk:
                by_group.setdefault(gi, []).append(p)
            index = sorted(by_group)
            worker = SMES(
                [self._hyper_keys(self.param_groups[gi]) | {"params": by_group[gi]}
                 for gi in index],
                backend=self.backend,
                amp_unscale=self.amp_unscale,
            )  # fmt: skip
            worker.state = self.state
            params = [p for gi in index for p in by_group[gi]]  # the worker's order
            # stochastic rounding: each param's seed from its place here, not in the worker
            worker._rounding_positions = {id(p): position[id(p)] for p in params}
            self._buckets.append(_Bucket(params, worker, index))
            for slot, p in enumerate(params):
                self._hooks.append(
                    p.register_post_accumulate_grad_hook(partial(_hook, ref, bi, slot))
                )

    @staticmethod
    def _hyper_keys(group: dict) -> dict:
        return {k: v for k, v in group.items() if k != "params"}

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_attached", False):
            raise RuntimeError(
                "SMES in backward cannot take a param group after attach(): its hooks and "
                "buckets are made once. Attach again with all groups (and load the state_dict)"
            )
        super().add_param_group(param_group)

    def detach(self) -> None:
        """Remove the hooks: backward no longer steps anything, ``step()`` steps the gradients
        there are (as SMES does) and frees them."""
        with self._lock:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            for b in self._buckets:
                for p in b.params:
                    if _owner(p) is self:
                        del _ATTACHED[id(p)]
            self._unready()  # gradients already final stay for step()

    def __getstate__(self):
        raise TypeError(
            "SMES in backward holds hooks on its parameters and cannot be pickled or deep-copied;"
            " save opt.state_dict() (the format of smes_fused.SMES) instead"
        )

    # ---------------------------------------------------------------- from backward

    def _on_grad(self, bi: int, slot: int, param: Tensor) -> None:
        with self._lock:
            b = self._buckets[bi]
            if b.stepped[slot] == self._iteration or b.ready[slot]:
                # The refused backward's gradient is dropped (autograd has accumulated it), so
                # that step() can end the iteration.
                param.grad = None
                raise RuntimeError(
                    f"SMES in backward: a backward reached a parameter (shape "
                    f"{tuple(param.shape)}) that was already stepped since the last "
                    "optimizer.step(). Gradient accumulation over micro-batches cannot work "
                    "here: each parameter is stepped, and its gradient freed, as soon as one "
                    "backward has finished that gradient, so a second backward would step it "
                    "again on a partial gradient. Call optimizer.step() once after every "
                    "backward (it ends the iteration), or accumulate with smes_fused.SMES"
                )
            if not self._queued:
                # First hook of this backward: check every group before any bucket is stepped
                # (an lr a scheduler made invalid fails here, with nothing changed), and step
                # the buckets left incomplete when this backward ends.
                try:
                    if self.max_grad_norm is not None:  # set after attach()
                        raise ValueError(_no_clipping(self.max_grad_norm))
                    for group in self.param_groups:
                        _group_hyper(group)
                except Exception:
                    # this backward's gradient is dropped, as for every refusal here: nothing
                    # was stepped on it, and a later iteration must not add it to its own
                    param.grad = None
                    raise
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self._queued = True
            b.ready[slot] = True
            b.count += 1
            if b.count == len(b.params):
                self._step_bucket(b)

    def _end_of_backward(self) -> None:
        with self._lock:
            self._queued = False
            self._flush_pending()

    def _flush_pending(self) -> None:
        for b in self._buckets:
            if b.count:
                self._step_bucket(b)

    def _step_bucket(self, b: _Bucket) -> None:
        groups = self.param_groups  # read afresh: load_state_dict replaces the dicts
        for wg, gi in zip(b.worker.param_groups, b.group_index):
            for k, v in groups[gi].items():
                if k != "params":
                    wg[k] = v
        had_grad = [p.grad is not None for p in b.params]
        b.worker.step()
        for i, p in enumerate(b.params):
            p.grad = None
            if had_grad[i]:
                b.stepped[i] = self._iteration
        b.ready = [False] * len(b.params)
        b.count = 0

    # ---------------------------------------------------------------- the optimizer API

    def step(self, closure=None, *, grad_scale: Tensor | None = None, found_inf=None):
        """End the iteration: the parameters were stepped during backward. Steps what no hook
        saw (a gradient set by hand, a parameter unfrozen after attach) and frees those
        gradients. With a closure, runs it (its backward steps the parameters) first."""
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None or found_inf is not None:
            # GradScaler.step set these on the optimizer and deletes them only when step()
            # returns; the iteration ends here (its gradients dropped), so that the next one
            # is not refused as a second backward.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            with self._lock:
                self._queued = False
                self._unready()
                for g in self.param_groups:
                    for p in g["params"]:
                        p.grad = None
                self._iteration += 1
            raise RuntimeError(
                "SMES in backward cannot take grad_scale/found_inf (torch.amp.GradScaler): the "
                "parameters were stepped during backward, before the scaler could unscale the "
                "gradients or check them for inf, so this iteration's steps used the scaled "
                "gradients: restore the parameters and optimizer state from a checkpoint. Use "
                "bf16 autocast (no loss scaling), or smes_fused.SMES"
            )
        if self.max_grad_norm is not None:
            raise ValueError(_no_clipping(self.max_grad_norm))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._lock:
            self._queued = False
            self._flush_pending()  # a backward that raised half-way never ran its callback
            self._step_rest()
            self._iteration += 1
        return loss

    def _unready(self) -> None:
        """Forget which gradients are final (they stay where they are)."""
        for b in self._buckets:
            b.ready = [False] * len(b.params)
            b.count = 0

    def _step_rest(self) -> None:
        stray = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not stray:
            return
        hooked = (
            {id(p): (b, i) for b in self._buckets for i, p in enumerate(b.params)}
            if self._hooks
            else {}
        )
        for p in stray:
            b, slot = hooked.get(id(p), (None, 0))
            if b is not None and b.stepped[slot] == self._iteration:
                raise RuntimeError(
                    f"SMES in backward: a parameter (shape {tuple(p.shape)}) has a gradient "
                    "again after its step in this iteration (set by hand after backward?); "
                    "stepping it twice would not be one SMES step"
                )
        if self._rest is None:
            self._rest = SMES(
                [self._hyper_keys(g) | {"params": g["params"]} for g in self.param_groups],
                backend=self.backend,
                amp_unscale=self.amp_unscale,
            )
        rest = self._rest
        rest.state = self.state
        for wg, g in zip(rest.param_groups, self.param_groups):
            wg.update(self._hyper_keys(g))
        rest.step()
        for p in stray:
            p.grad = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for w in [b.worker for b in self._buckets] + [self._rest]:
            if w is not None:
                w.state = self.state  # the load installed a new state dict
                w._plan = None


def attach(
    model_or_params: nn.Module | object,
    bucket_size_bytes: int = DEFAULT_BUCKET_BYTES,
    *,
    max_grad_norm: float | None = None,
    **smes_kwargs,
) -> InBackwardSMES:
    """Attach SMES to a model so that backward steps its parameters; returns the optimizer.

    ``model_or_params``: an ``nn.Module`` (its ``parameters()``), or parameters / param groups
    as SMES takes them (``smes_fused.depth_param_groups(model, ...)``, say).
    ``bucket_size_bytes``: see :class:`InBackwardSMES`. ``max_grad_norm`` is refused with the
    reason. Other keyword arguments go to :class:`~smes_fused.SMES`.
    """
    params = (
        model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    )
    return InBackwardSMES(
        params, bucket_size_bytes=bucket_size_bytes, max_grad_norm=max_grad_norm, **smes_kwargs
    )
