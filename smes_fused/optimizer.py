"""The SMES optimizer: a drop-in for torch.optim.AdamW with a real exponent p."""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections import OrderedDict
from itertools import groupby

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _ops, functional
from ._bucket import Bucket, BucketKey

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def lr_for_exponent(exponent: float, adamw_lr: float = 1e-3, typical_grad: float = 1e-2) -> float:
    r"""A learning rate for ``SMES(exponent=p)`` from the one that works for AdamW.

    The SMES step scales like :math:`\eta\,|g|^{1-2p}`: at p = 0.5 its size is about η whatever
    the gradient (AdamW), at p = 0 it is η·|g| (SGD), and at p < 0 it shrinks faster than |g|.
    So the same lr cannot serve every p. This rule keeps the step of a gradient entry of size
    ``typical_grad`` equal to AdamW's at ``adamw_lr``:

    .. math:: \eta(p) = \eta_{\text{AdamW}} \cdot g_{\text{typ}}^{\,2p - 1}

    that is, log-linear in p between ``adamw_lr`` at p = 0.5 and ``adamw_lr / typical_grad`` at
    p = 0 (an SGD-scale lr: with β1 = 0.9 it is torch SGD's ``lr·(1−β1)`` with momentum 0.9).
    With the defaults: 1e-3 at p = 0.5, 0.1 at p = 0, 0.21 at p = −0.08. It is a starting point
    for a sweep (``python -m smes_fused.sweep`` searches ×¼ … ×4 around it), not a tuned value.
    """
    for name, x in (("exponent", exponent), ("adamw_lr", adamw_lr), ("typical_grad", typical_grad)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"lr_for_exponent: invalid {name}: {x!r}; expected a finite number")
    if not typical_grad > 0 or not adamw_lr > 0:
        raise ValueError(
            f"lr_for_exponent needs adamw_lr > 0 and typical_grad > 0, got {adamw_lr}, "
            f"{typical_grad}"
        )
    lr = adamw_lr * typical_grad ** (2.0 * exponent - 1.0)
    if not 0 < lr < math.inf:
        raise ValueError(
            f"lr_for_exponent({exponent}, {adamw_lr}, {typical_grad}) = {lr}: outside the "
            "floats (an exponent far from [-1, 1]?)"
        )
    return lr


# SPEC §4 options: a group (or a pickle / checkpoint) made before they existed has their defaults.
_EXTENSION_DEFAULTS = {
    k: v for k, v in functional.OPTION_DEFAULTS.items() if k != "track_second_moment"
}


class SMES(Optimizer):
    r"""Second-Moment Exponential Scaling: Adam whose denominator is :math:`\hat v^p`.

    .. code-block:: text

        input: θ_0, lr η, betas (β1, β2), eps ε, exponent p, weight decay λ
        for t = 1, 2, ...:
            g_t = ∇f(θ_{t-1})                    (−∇f if maximize; · 1/grad_scale if given)
            g_t = g_t + λ θ_{t-1}                if λ ≠ 0 and not decoupled   (L2)
            θ_{t-1} = θ_{t-1} (1 − η λ)          if λ ≠ 0 and decoupled       (AdamW)
            m_t = β1 m_{t-1} + (1 − β1) g_t
            v_t = β2 v_{t-1} + (1 − β2) g_t²     if v is tracked (p ≠ 0 or track_second_moment)
            v_t = max(v_max, v_t)                if amsgrad
            bc1 = 1 − β1^t, bc2 = 1 − β2^t       (1 if not bias_correction; float64)
            D   = (v_t / bc2)^p + ε              (p = 0.5: sqrt(v_t)/sqrt(bc2) + ε; p = 0: 1 + ε)
            θ_t = θ_{t-1} − (η / bc1) m_t / D

    ``p = 0.5`` is exactly :class:`torch.optim.AdamW` (and, with
    ``decoupled_weight_decay=False``, :class:`torch.optim.Adam`); ``p = 0`` with
    ``bias_correction=False`` is ``torch.optim.SGD(lr=η(1−β1), momentum=β1)``; ``p < 0`` tilts
    training toward generalisation (Balance theory, the paper in README).

    The step scales like ``lr·|g|^(1−2p)``, so an lr tuned for AdamW is far too small at p ≤ 0:
    :func:`lr_for_exponent` converts it (e.g. 1e-3 at p = 0.5 → 0.21 at p = −0.08).

    Args:
        params: parameters or param groups.
        lr: learning rate η (float or 1-element tensor). Default 1e-3.
        betas: (β1, β2). Default (0.9, 0.999).
        eps: ε added to the denominator. Default 1e-8; must be > 0 when p > 0.
        weight_decay: λ. Default 1e-2 (as AdamW).
        amsgrad: use the running maximum of v (AdamW's sixth positional argument).
        exponent: the balance coefficient p (keyword only). Default 0.5 (AdamW).
        decoupled_weight_decay: AdamW-style decay (default) or L2 added to the gradient.
        maximize: maximize the objective.
        bias_correction: divide by 1 − β^t. Default True.
        track_second_moment: keep ``exp_avg_sq`` even at p = 0 (needed to change p later, e.g.
            an exponent schedule). Default: ``exponent != 0``.
        projection: AdamP/SGDP's projection (SPEC §4): for tensors of dim > 1 whose gradient is
            nearly orthogonal to the weight (per output channel, then per layer: max |cos| <
            ``projection_delta``/sqrt(row length)), remove the radial component of the update
            and scale the decoupled decay by ``projection_wd_ratio``. Default False.
        projection_delta, projection_wd_ratio: AdamP's ``delta`` (0.1) and ``wd_ratio`` (0.1).
        rectify: RAdam's rectification at any exponent: while ρ_t ≤ 5 the step is the momentum
            step (D = 1), then the adaptive step times r_t, with ε added before the bias
            correction as torch's RAdam does (D = v̂^p + ε/bc2^p). Default False.
        second_moment: ``"ema"`` (default, Adam's moving average) or ``"sum"`` (AdaGrad:
            v ← v + g², no second bias correction).
        stochastic_rounding: bf16 params only: round the new θ to bfloat16 stochastically
            (unbiased), reproducible from ``rounding_seed`` and the step, instead of to nearest.
            Keeps small updates (p < 0: about lr·|g|) from vanishing below bf16 resolution.
        rounding_seed: the seed of the rounding (an integer in [0, 2**32)). Default 0.
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq``. Default (None): float32 for 16-bit
            params, the param's dtype otherwise; ``"param"``: always the param's dtype.
        capturable: keep ``step`` on the param's device and compute bias corrections there, so
            the step can be captured in a CUDA graph.
        backend: ``"auto"`` (default), ``"reference"``, ``"foreach"``, ``"cpu"``, ``"cuda"`` or
            ``"triton"``; see README "Backends".
        amp_unscale: who unscales the grads under ``torch.amp.GradScaler``: ``"step"``
            (default: the step takes ``grad_scale``/``found_inf`` and unscales in the kernel, as
            torch's fused optimizers do) or ``"scaler"`` (the scaler unscales first, as for
            foreach AdamW: what Lightning needs to clip gradients under mixed precision).
        foreach, fused, differentiable: AdamW's, taken so that its calls run unchanged:
            ``foreach`` and ``fused`` are kept in the groups (an AdamW loading the state dict
            reads them) but do not choose SMES's kernels (``backend`` does: ``"auto"`` takes
            the fused one where there is one); ``differentiable=True`` is not implemented.
        max_grad_norm: clip the gradients by their global L2 norm inside the step, as
            ``clip_grad_norm_`` before it would (README, fused clipping); also an attribute,
            read at every step. ``opt.grad_norm`` is then the norm of the step's gradients (a
            0-d tensor; 0 without gradients), and None after a step without clipping.

    ``step(closure=None, *, grad_scale=None, found_inf=None)`` accepts the unscale factor and
    inf flag of :class:`torch.amp.GradScaler`, which passes them automatically.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,  # AdamW's positional order
        *,
        exponent: float = 0.5,
        decoupled_weight_decay: bool = True,
        maximize: bool = False,
        bias_correction: bool = True,
        track_second_moment: bool | None = None,
        projection: bool = False,
        projection_delta: float = 0.1,
        projection_wd_ratio: float = 0.1,
        rectify: bool = False,
        second_moment: str = "ema",
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        state_dtype: torch.dtype | str | None = None,
        capturable: bool = False,
        backend: str = "auto",
        amp_unscale: str = "step",
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ):
        if differentiable is not False:
            raise NotImplementedError(
                f"differentiable={differentiable!r}: SMES's step is not differentiable (torch's "
                "differentiable=True mode, for meta-learning through the update, is not "
                "implemented); use torch.optim.AdamW(differentiable=True) for that"
            )
        functional.check_backend_name(backend)
        _check_max_grad_norm(max_grad_norm)
        self.max_grad_norm = functional.plain_value(max_grad_norm)
        self._step_out: dict = {"grad_norm": None}  # see grad_norm
        if amp_unscale not in ("step", "scaler"):
            raise ValueError(f"Invalid amp_unscale: {amp_unscale!r}; expected 'step' or 'scaler'")
        self.backend = backend
        self.amp_unscale = amp_unscale
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,  # as torch's Adam(W)
            eps=eps,
            weight_decay=weight_decay,
            exponent=exponent,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            bias_correction=bias_correction,
            track_second_moment=track_second_moment,
            projection=projection,
            projection_delta=projection_delta,
            projection_wd_ratio=projection_wd_ratio,
            rectify=rectify,
            second_moment=second_moment,
            stochastic_rounding=stochastic_rounding,
            rounding_seed=rounding_seed,
            state_dtype=state_dtype,
            capturable=capturable,
            # torch.optim.Adam(W)'s keys, so an SMES state_dict loads into AdamW unchanged.
            foreach=foreach,
            fused=fused,
            differentiable=False,
        )
        super().__init__(params, defaults)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Read by torch.amp.GradScaler (and Lightning): True hands the step ``grad_scale`` and
        ``found_inf`` (unscaled inside the kernel, no host sync); False lets the scaler unscale
        the grads itself first (``amp_unscale="scaler"``), as for foreach AdamW."""
        return self.amp_unscale == "step"

    # ---------------------------------------------------------------- pickling and deepcopy

    def __getstate__(self) -> dict:
        # torch's base class keeps defaults, state and param_groups; the backend and the AMP
        # mode are ours. The cached plan (and its C++ handle) is rebuilt by the copy's first step.
        return {
            **super().__getstate__(),
            "backend": self.backend,
            "amp_unscale": self.amp_unscale,
            "max_grad_norm": self.max_grad_norm,
        }

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")  # pickles from before these were kept
        self.__dict__.setdefault("amp_unscale", "step")
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("_step_out", {"grad_norm": None})
        for group in self.param_groups:  # options added since the pickle was made
            for k, v in _EXTENSION_DEFAULTS.items():
                group.setdefault(k, v)

    @property
    def grad_norm(self) -> Tensor | None:
        """The global norm of the last step's gradients where the step clipped them
        (``max_grad_norm``), else None. Kept in a dict the step writes into: torch.compile
        drops a compiled step's attribute writes on an optimizer, not its dicts' items."""
        return self._step_out["grad_norm"]

    @grad_norm.setter
    def grad_norm(self, value: Tensor | None) -> None:
        self._step_out["grad_norm"] = value

    # ---------------------------------------------------------------- groups and validation

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        # Normalised once, here: a generator (model.parameters()) is consumed exactly once and
        # torch's base class receives the list.
        params = group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be an ordered collection (a list, a tuple or a "
                "generator), not a set: the order of a set changes between runs"
            )
        group["params"] = params = list(params)
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        for k in group:  # numpy scalars taken, kept as Python values
            if k != "params":
                group[k] = functional.plain_value(group[k])
        if isinstance(group["betas"], (tuple, list)):
            group["betas"] = type(group["betas"])(map(functional.plain_value, group["betas"]))
        if group["track_second_moment"] is None:
            group["track_second_moment"] = group["exponent"] != 0
        _group_hyper(group)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # (name, param) pairs
        # non-tensors: torch's base class raises its TypeError
        twice = functional.first_repeat((i, p) for i, p in enumerate(tensors)
                                        if isinstance(p, Tensor))  # fmt: skip
        if twice is not None:
            j, i = twice
            raise ValueError(
                f"param group {len(self.param_groups)} contains the same parameter (shape "
                f"{tuple(tensors[i].shape)}) more than once, at positions {j} and {i}: pass each "
                "parameter once (a parameter updated twice per step would be a data race in the "
                "fused kernels)"
            )
        for p in tensors:
            if isinstance(p, Tensor):
                functional.check_param(p)
        # An explicit backend that cannot run these params says so now, not at the first step.
        keys = {BucketKey(p.device, p.dtype, self._state_dtype(group, p)) for p in tensors
                if isinstance(p, Tensor)}  # fmt: skip
        functional.resolve(keys, self.backend)
        super().add_param_group(group)

    @staticmethod
    def _state_dtype(group: dict, p: Tensor) -> torch.dtype:
        sd = group["state_dtype"]
        if sd is None:
            return torch.float32 if p.dtype in _SIXTEEN_BIT else p.dtype
        if sd == "param":
            return p.dtype
        return sd

    # ---------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: Tensor | None = None, found_inf=None):
        """One optimization step; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if type(found_inf) is int and found_inf == 0:
            # GradScaler's sum([]) over no devices: none of this optimizer's params had a grad
            # (fused AdamW never reads it then)
            found_inf = None
        grad_scale = functional.scalar_tensor("grad_scale", grad_scale)
        found_inf = functional.scalar_tensor("found_inf", found_inf)
        clip = self.max_grad_norm
        _check_max_grad_norm(clip)

        # Nothing is mutated until everything is validated and every bucket has a backend.
        hypers = [_group_hyper(group) for group in self.param_groups]
        plan = getattr(self, "_plan", None)
        if plan is not None and not plan.state_intact(self):
            plan = None  # state replaced by hand: the step reads it afresh, as torch's do
        if (
            plan is not None
            and plan.fast is not None
            and clip is None  # the norm needs the grads first
            and not torch.compiler.is_compiling()  # compiled steps trace the op
            and plan.fits_same_grads(self, hypers)
            and plan.fast(hypers, grad_scale=grad_scale, found_inf=found_inf)
        ):
            self._step_out["grad_norm"] = None  # not the norm of an earlier, clipped step
            return loss
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        if plan is None or not plan.fits(self, hypers, grads):
            plan = self._plan = _Plan(self, hypers, grads)
        else:
            plan.refresh(hypers, grads)
        norm = None
        if clip is not None:
            norm, grad_scale = _clip_scale(grads, clip, grad_scale)
        functional.apply(plan.buckets, plan.backends, grad_scale=grad_scale, found_inf=found_inf)
        # after apply, which refuses bad state with nothing changed
        self._step_out["grad_norm"] = norm
        return loss

    @staticmethod
    def _init_state(p: Tensor, state: dict, group: dict, sdt: torch.dtype, on_device: bool):
        step_dev = p.device if on_device else torch.device("cpu")
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=step_dev)
        elif state["step"].device != step_dev:
            state["step"] = state["step"].to(step_dev)

        def zeros():
            return torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)

        if "exp_avg" not in state:
            state["exp_avg"] = zeros()
        if group["track_second_moment"]:
            if "exp_avg_sq" not in state:
                state["exp_avg_sq"] = zeros()
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = zeros()

    # ---------------------------------------------------------------- checkpoints

    def load_state_dict(self, state_dict: dict) -> None:
        """Load an SMES, AdamW or Adam state_dict without ever downcasting state.

        Keys an AdamW/Adam checkpoint lacks (``exponent``, ...) keep this optimizer's values, so
        an AdamW checkpoint continues as AdamW would in ``SMES(exponent=0.5)``. Checkpoints
        whose ``step`` is a Python number (torch < 1.12) load too. Everything is checked before
        anything changes: another optimizer's state dict, a state without ``step`` or
        ``exp_avg``, wrong shapes, or state this optimizer's backend cannot run raise an error.

        Load-state-dict pre-hooks run first, as in torch, and what they return is what is
        loaded; post-hooks run last, on the loaded state.
        """
        state_dict = state_dict.copy()  # shallow, as torch does
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        for hook in pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, kept = self._check_loaded(state_dict)

        # torch's base class maps saved ids to params and installs groups and state. The hooks
        # above already ran, and the post-hooks must see the state after the dtype pass below.
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict({"state": state_dict["state"], "param_groups": groups})
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        self._state_version = getattr(self, "_state_version", 0) + 1

        # torch's base class casts state to the param's dtype (bf16 params -> bf16 state):
        # redo it from the same loaded tensors, never narrowing them; steps become float32
        # tensors (a Python number in a torch < 1.12 checkpoint too).
        for p, (saved, dtype) in kept.items():
            state = self.state[p]
            for name in _STATE_KEYS:
                t = saved.get(name)
                if t is not None:
                    state[name] = t.to(device=p.device, dtype=dtype, copy=True)
            step = saved["step"]
            state["step"] = (
                step.detach().to(torch.float32, copy=True).reshape(())
                if torch.is_tensor(step)
                else torch.tensor(float(step), dtype=torch.float32)
            )
        for hook in post_hooks.values():
            hook(self)

    def _check_loaded(self, state_dict: dict) -> tuple[list[dict], dict]:
        """The param groups to install and, per param with state, (saved state, state dtype);
        raises (having changed nothing) when the state dict does not fit this optimizer."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("a state dict has the keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        groups = []
        for i, (saved, cur) in enumerate(zip(saved_groups, self.param_groups)):
            missing = [k for k in ("betas", "eps") if k not in saved]
            if missing:
                raise ValueError(
                    f"param group {i} of the loaded state dict has no {missing}: it is not a "
                    f"state dict of SMES, AdamW or Adam (its keys: {sorted(saved)})"
                )
            if len(saved["params"]) != len(cur["params"]):
                raise ValueError(
                    f"param group {i} of the loaded state dict has {len(saved['params'])} "
                    f"params, this optimizer's has {len(cur['params'])}"
                )
            g = dict(saved)
            for k, v in cur.items():
                if k not in g and k != "params":
                    g[k] = v
            if "track_second_moment" not in saved:
                g["track_second_moment"] = g["exponent"] != 0 or cur["track_second_moment"]
            _group_hyper(g)
            groups.append(g)

        # Saved id -> (param, its new group), as torch's load_state_dict maps them.
        id_map = {
            k: (p, g)
            for saved, cur, g in zip(saved_groups, self.param_groups, groups)
            for k, p in zip(saved["params"], cur["params"])
        }
        kept: dict = {}
        keys = set()
        for k, st in state_dict["state"].items():
            if k not in id_map:
                continue
            p, g = id_map[k]
            where = f"the loaded state of parameter {k} (shape {tuple(p.shape)})"
            if not isinstance(st, dict):
                raise ValueError(f"{where} is a {type(st).__name__}, not a dict")
            if not st:
                continue
            need = ["step", "exp_avg"]
            if g["track_second_moment"]:
                need.append("exp_avg_sq")
                if g["amsgrad"]:
                    need.append("max_exp_avg_sq")
            missing = [n for n in need if n not in st]
            if missing:
                raise ValueError(
                    f"{where} has no {missing} (its keys: {sorted(st)}): it is not the state "
                    "of SMES, AdamW or Adam with these settings"
                )
            step = st["step"]
            ok = (torch.is_tensor(step) and step.numel() == 1 and not step.is_complex()) or (
                isinstance(step, (int, float)) and not isinstance(step, bool)
            )
            if not ok or not (math.isfinite(float(step)) and float(step) >= 0):
                raise ValueError(
                    f"{where} has step {step!r}; expected a non-negative number or 1-element tensor"
                )
            dtype = self._state_dtype(g, p)
            for name in _STATE_KEYS:
                t = st.get(name)
                if t is None:
                    continue
                if not torch.is_tensor(t) or not t.is_floating_point():
                    raise ValueError(f"{where}: {name} must be a floating-point tensor, got {t!r}")
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{where}: {name} has shape {tuple(t.shape)}, which does not match its "
                        "parameter's"
                    )
                if _wider(t.dtype, dtype):
                    warnings.warn(
                        f"loaded {name} is {t.dtype}, wider than this optimizer's state dtype "
                        f"{dtype}; keeping {t.dtype} rather than downcasting",
                        stacklevel=3,
                    )
                    dtype = t.dtype
            kept[p] = (st, dtype)
            keys.add(BucketKey(p.device, p.dtype, dtype))
        try:
            functional.resolve(keys, self.backend)
        except RuntimeError as e:
            raise ValueError(
                f"the loaded state cannot be stepped by this optimizer: {e}. Load it into an "
                "optimizer with backend='foreach', or cast the checkpoint's state tensors first"
            ) from None
        return groups, kept


def _check_max_grad_norm(x) -> None:
    if x is None:
        return
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not x > 0:
        raise ValueError(
            f"Invalid max_grad_norm: {x!r} ({type(x).__name__}); expected None or a real "
            "number > 0 (inf: compute the norm without clipping)"
        )


def _clip_scale(grads: list, max_norm: float, grad_scale: Tensor | None):
    """Fused global gradient-norm clipping: the L2 norm of this step's gradients (of the
    unscaled ones under a GradScaler), as ``torch.nn.utils.clip_grad_norm_`` computes it (one
    multi-tensor pass per device and dtype; across ranks for DTensor gradients), and the
    grad_scale that makes the step kernels apply the clip coefficient
    ``min(1, max_norm / (norm + 1e-6))`` with the unscaling, in the same read of g: no extra
    pass over the gradients, no host sync. Returns (norm, grad_scale)."""
    present = [g for g in grads if g is not None]
    if not present:  # as clip_grad_norm_ of no gradients
        return torch.zeros(()), grad_scale
    norm = _total_norm(present)
    if _is_dtensor(norm):
        norm = norm.full_tensor()
    norm = norm.float()
    if grad_scale is not None:
        norm = norm / grad_scale.to(norm.device, torch.float32)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    scale = 1.0 / coef if grad_scale is None else grad_scale.to(coef.device, torch.float32) / coef
    return norm, scale


def _total_norm(grads: list[Tensor]) -> Tensor:
    """The L2 norm of ``grads`` as ``torch.nn.utils.get_total_norm`` computes it (one
    multi-tensor pass per device and dtype), but accumulated in float32 for 16-bit grads: their
    own dtype overflows on GradScaler-scaled float16 grads (65536 times a norm of 1 is past
    float16's 65504) and rounds a bf16 norm to 3 digits."""
    groups: dict = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    norms = []
    for (_, dtype), ts in groups.items():
        wide = None if dtype in (torch.float32, torch.float64) else torch.float32
        norms.extend(torch._foreach_norm(ts, 2.0, dtype=wide))
    first = grads[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), 2.0)


def _is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (FSDP2, tensor parallel), stepped through its local shard.
    Without importing torch.distributed.tensor (~3 s): no DTensor exists before it is imported."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _local(t):
    """A DTensor's local shard (the same memory), any other value as it is."""
    return t.to_local() if _is_dtensor(t) else t


def _local_grad(p: Tensor, g: Tensor) -> Tensor:
    """The local shard of a DTensor param's grad, laid out as the param is: a grad with other
    placements (a Partial sum, say) is redistributed first, as DTensor's own pointwise ops
    would."""
    if not _is_dtensor(p):
        return g
    if g.placements != p.placements:
        g = g.redistribute(p.device_mesh, p.placements)
    return g.to_local()


def _shard_offset(p) -> int:
    """The index in the whole param (row-major) of a DTensor's first local element."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    flat, stride = 0, 1
    for size, offset in zip(reversed(p.shape), reversed(offsets)):
        flat += offset * stride
        stride *= size
    return flat


def _wider(a: torch.dtype, b: torch.dtype) -> bool:
    return torch.finfo(a).bits > torch.finfo(b).bits or (a == torch.float32 and b in _SIXTEEN_BIT)


def _check_state(p: Tensor, state: dict) -> None:
    for name in _STATE_KEYS:
        t = state.get(name)
        if t is not None and (t.shape != p.shape or t.device != p.device):
            raise RuntimeError(
                f"state {name!r} ({tuple(t.shape)} on {t.device}) does not match its parameter "
                f"({tuple(p.shape)} on {p.device})"
            )


_FLAGS = ("decoupled_weight_decay", "amsgrad", "maximize", "bias_correction", "capturable",
          "projection", "rectify", "stochastic_rounding")  # fmt: skip


def _group_hyper(group: dict):
    """The validated hyperparameters of one param group, as the backends read them (at
    construction, on load_state_dict and on every step)."""
    for name in _FLAGS:
        if not isinstance(group[name], bool):  # "no" or None read as a truth value
            flag = functional.plain_value(group[name])  # np.True_ set by hand
            if not isinstance(flag, bool):
                raise TypeError(f"Invalid {name}: {group[name]!r}; expected True or False")
            group[name] = flag
    if type(group["second_moment"]) is not str:  # np.str_ set by hand: a Python str
        group["second_moment"] = functional.plain_value(group["second_moment"])
    for name in ("foreach", "fused"):  # AdamW's, kept for it
        flag = group.get(name)
        if not (flag is None or flag is True or flag is False):  # 1 == True: not `in`
            raise TypeError(f"Invalid {name}: {flag!r}; expected None, True or False")
    if group.get("differentiable", False) is not False:
        raise NotImplementedError(
            f"differentiable={group['differentiable']!r}: SMES's step is not differentiable"
        )
    sd = group["state_dtype"]
    if not (sd is None or sd == "param" or (isinstance(sd, torch.dtype) and sd.is_floating_point)):
        raise ValueError(
            f"Invalid state_dtype: {sd!r}; expected None, 'param' or a floating torch.dtype"
        )
    return functional.make_hyper(**{k: group[k] for k in functional.HYPER_KEYS})


def _signature(opt: SMES, hypers: list) -> tuple:
    """What the buckets are made of, apart from the gradients: the groups' params (which
    tensors: a param replaced in its group's list is seen) and structural settings, the backend,
    and the state (replaced by load_state_dict or by hand)."""
    return (
        opt.backend,
        id(opt.state),
        len(opt.state),
        getattr(opt, "_state_version", 0),
        tuple(
            (tuple(map(id, g["params"])), h.variant, g["state_dtype"], g["capturable"])
            for g, h in zip(opt.param_groups, hypers)
        ),
    )


class _Plan:
    """The buckets of one optimizer, kept between steps.

    Built (with full validation and lazy state creation) on the first step and whenever the
    groups' structure, the set of params with gradients, the backend or the state changes. On
    the other steps only the gradients (new tensors after ``zero_grad()``) and the hyperparameter
    values (lr schedules) are refreshed: a few list operations per tensor. Gradients of the
    wrong shape, dtype or device are rarely seen (autograd refuses to assign them to ``.grad``,
    but ``.grad.data`` and in-place resizes get through): :meth:`refresh` checks every step's
    gradients against their params (in C++, ~20 ns a pair) before anything is written.

    A single bucket on the "cpu" backend is also kept in C++ (``fast``, see
    ``CompiledBackend.fast_bucket``): while the signature holds and no param without a gradient
    gains one, a step hands it the groups' hyperparameters and the C++ reads every ``.grad``
    itself. It declines (changing nothing) on anything unusual, and the general path runs.
    """

    def __init__(self, opt: SMES, hypers: list, grads: list) -> None:
        groups = opt.param_groups
        # add_param_group refuses a param twice; param_groups edited by hand are checked here
        twice = functional.first_repeat(
            ((gi, i), p) for gi, group in enumerate(groups) for i, p in enumerate(group["params"])
        )
        if twice is not None:
            (g0, i0), (gi, i) = twice
            raise ValueError(
                f"the same parameter (shape {tuple(groups[gi]['params'][i].shape)}) is in param "
                f"group {g0} at position {i0} and in param group {gi} at position {i}: each "
                "parameter must be in the param groups once (a parameter updated twice per step "
                "would be a data race in the fused kernels)"
            )
        functional.check_grads([p for group in groups for p in group["params"]], grads)
        todo = []  # (flat index, param, group index, state dtype)
        keys: set[BucketKey] = set()
        flat = 0
        for gi, group in enumerate(groups):
            for p in group["params"]:
                g = grads[flat]
                if g is not None:
                    functional.check_param(p)  # params appended to a group by hand, too
                    state = opt.state.get(p)
                    if state and "exp_avg" in state:
                        _check_state(p, state)
                        sdt = state["exp_avg"].dtype
                    else:
                        sdt = opt._state_dtype(group, p)
                    todo.append((flat, p, gi, sdt))
                    keys.add(BucketKey(p.device, p.dtype, sdt))
                flat += 1
        self.backends = functional.resolve(keys, opt.backend)
        for _, p, gi, _ in todo:
            if hypers[gi].projection and p.dim() > 1 and _is_dtensor(p):
                raise NotImplementedError(
                    f"projection=True with a sharded (DTensor) parameter of shape "
                    f"{tuple(p.shape)}: the projection's per-row and per-layer reductions would "
                    "need a reduction across shards, which SMES does not do yet; set "
                    "projection=False for this param group, or use DDP (whole parameters)"
                )

        # Validated: create missing state and fill the buckets. DTensor params (FSDP2, tensor
        # parallel) and their state are entered as their local shards: the rule is elementwise,
        # so every backend updates what this rank holds, in place, while opt.state keeps the
        # DTensors (distributed checkpoints read them). ``refs`` holds what opt.state holds.
        self.dtensor = any(_is_dtensor(p) for _, p, _, _ in todo)
        self.buckets: dict[BucketKey, Bucket] = {}
        self.refs: dict[BucketKey, Bucket] = {}
        self.index: dict[BucketKey, list[int]] = {}  # flat param index per bucket tensor
        self.group_of: dict[BucketKey, list[int]] = {}  # group index per bucket tensor
        # stochastic rounding: each param's seed from its position (the in-backward helper's
        # workers give their owner's) and a shard's offset (Bucket.salts)
        positions = getattr(opt, "_rounding_positions", None) or {}
        for i, p, gi, sdt in todo:
            group, h = groups[gi], hypers[gi]
            key = BucketKey(p.device, p.dtype, sdt)
            on_device = group["capturable"] or self.backends[key].steps_on_device
            state = opt.state[p]
            opt._init_state(p, state, group, sdt, on_device)
            entry = (
                p,
                grads[i],
                state["exp_avg"],
                state.get("exp_avg_sq"),
                state.get("max_exp_avg_sq"),
                state["step"],
                h,
            )
            functional.add_to_buckets(self.refs, *entry)
            if self.dtensor:
                entry = (_local(p), _local_grad(p, grads[i]), *map(_local, entry[2:6]), h)
            offset = _shard_offset(p) if h.stochastic_rounding and _is_dtensor(p) else 0
            salt = functional.rounding_salt(h, p, positions.get(id(p), i), offset)
            functional.add_to_buckets(self.buckets, *entry, salt)
            self.index.setdefault(key, []).append(i)
            self.group_of.setdefault(key, []).append(gi)
        self.has_grad = [g is not None for g in grads]
        self.signature = _signature(opt, hypers)
        self.params = params = [p for group in groups for p in group["params"]]
        self.without_grad = [p for p, g in zip(params, grads) if g is None]
        # One bucket on the "cpu" backend (the usual case): kept in C++, whose steps read the
        # grads themselves (see CompiledBackend.fast_bucket).
        self.fast = None
        if len(self.buckets) == 1 and not self.dtensor and not torch.compiler.is_compiling():
            key, bucket = next(iter(self.buckets.items()))
            make = getattr(self.backends[key], "fast_bucket", None)
            if make is not None:
                runs = [(len(list(run)), gi) for gi, run in groupby(self.group_of[key])]
                self.fast = make(bucket, runs)

    def state_intact(self, opt: SMES) -> bool:
        """Whether ``opt.state`` still holds the tensors the buckets hold (an edit by hand, such
        as ``opt.state[p] = {}`` or a new ``exp_avg``, must take effect at the next step)."""
        return all(
            _ops.state_matches(
                opt.state, b.params, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, b.steps
            )
            for b in self.refs.values()
        )

    def fits(self, opt: SMES, hypers: list, grads: list) -> bool:
        return [g is not None for g in grads] == self.has_grad and _signature(
            opt, hypers
        ) == self.signature

    def fits_same_grads(self, opt: SMES, hypers: list) -> bool:
        """:meth:`fits`, for a step that finds the same params with gradients (the fast path
        checks its own params' grads in C++): no param left out gained one."""
        return _signature(opt, hypers) == self.signature and all(
            p.grad is None for p in self.without_grad
        )

    def refresh(self, hypers: list, grads: list) -> None:
        functional.check_grads(self.params, grads)  # every step, before anything is written
        if self.dtensor:
            grads = [None if g is None else _local_grad(p, g) for p, g in zip(self.params, grads)]
        for key, b in self.buckets.items():
            index, group_of = self.index[key], self.group_of[key]
            # One bucket of every gradient (the usual case): the list itself.
            b.grads = grads if len(index) == len(grads) else [grads[i] for i in index]
            if len(hypers) == 1:
                b.hypers = hypers * len(group_of)
            else:
                b.hypers = [hypers[gi] for gi in group_of]
