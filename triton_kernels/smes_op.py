"""The Triton step as a registered op, ``torch.ops.smes_fused.triton_step_``, so torch.compile
keeps it in its graph (no graph break) and functionalization sees what it mutates.

Eager callers use :func:`smes_fused.triton_kernels.smes.smes_step` directly (no dispatcher
overhead); the backend calls this op only while torch.compile traces. The op's arguments are
plain lists and the groups' hyperparameters flattened into a float64 CPU tensor,
``GROUP_FIELDS`` per group, with the lr either a value or an index into ``lr_tensors``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# beta1, beta2, eps, exponent, weight_decay, bias_correction, lr, lr tensor index, rectify,
# second_moment_sum, projection_delta, projection_wd_ratio, stochastic_rounding, rounding_seed
GROUP_FIELDS = 14


def flatten_groups(groups) -> tuple[Tensor, list[Tensor]]:
    """The groups' fields as one float64 CPU tensor, ``GROUP_FIELDS`` per group, and the lr
    tensors it indexes. Under torch.compile the graph builds the tensor (traced_scalar: an lr
    or exponent schedule)."""
    flat: list = []
    lr_tensors: list[Tensor] = []
    for h in groups:
        lr, idx = h.lr, -1.0
        if isinstance(lr, Tensor):
            idx = float(len(lr_tensors))
            lr_tensors.append(lr)
            lr = 0.0
        flat += [h.beta1, h.beta2, h.eps, h.exponent, h.weight_decay,
                 1.0 if h.bias_correction else 0.0, lr, idx,
                 1.0 if h.rectify else 0.0, 1.0 if h.second_moment_sum else 0.0,
                 h.projection_delta, h.projection_wd_ratio,
                 1.0 if h.stochastic_rounding else 0.0, float(h.rounding_seed)]  # fmt: skip
    if torch.compiler.is_compiling():
        from .._bucket import traced_scalar

        return torch.stack([traced_scalar(x) for x in flat]), lr_tensors
    return torch.tensor(flat, dtype=torch.float64), lr_tensors


def unflatten_groups(flat, lr_tensors) -> list:
    from .smes import GroupHyper

    flat = flat.tolist()  # a CPU tensor: no device sync
    out = []
    for r in range(len(flat) // GROUP_FIELDS):
        b1, b2, eps, p, wd, bc, lr, idx, rect, sv, delta, ratio, sr, seed = flat[
            r * GROUP_FIELDS : (r + 1) * GROUP_FIELDS
        ]
        lr = lr_tensors[int(idx)] if idx >= 0 else lr
        out.append(GroupHyper(lr, b1, b2, eps, p, wd, bc != 0.0, rect != 0.0, sv != 0.0,
                              delta, ratio, sr != 0.0, int(seed)))  # fmt: skip
    return out


@torch.library.custom_op(
    "smes_fused::triton_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"),
)
def triton_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    group_values: Tensor,
    lr_tensors: list[Tensor],
    group_index: list[int],
    variant: list[int],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One SMES step (two launches); ``exp_avg_sqs`` / ``max_exp_avg_sqs`` are empty when the
    variant does not track them; ``variant`` is (p_class, track_v, decoupled, amsgrad,
    maximize, projection) as ints."""
    from .._bucket import Variant
    from .smes import step_groups

    var = Variant(int(variant[0]), *(bool(x) for x in variant[1:]))
    n = len(params)
    step_groups(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs if exp_avg_sqs else [None] * n,
        max_exp_avg_sqs if max_exp_avg_sqs else [None] * n,
        steps,
        unflatten_groups(group_values, lr_tensors),
        list(group_index),
        var,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


@triton_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_values, lr_tensors,
      group_index, variant, grad_scale, found_inf) -> None:  # fmt: skip
    return None
