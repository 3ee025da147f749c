"""Per-layer size of each optimizer step relative to the weight it updates."""

from __future__ import annotations

import math

import torch


class UpdateRatioTracker:
    """Per layer, ``||W_after - W_before|| / ||W_before||`` of each optimizer step.

    Call :meth:`before_step` just before ``optimizer.step()`` and :meth:`after_step` just after;
    :meth:`mean` averages the recorded steps (since the last :meth:`reset`, or all of them). A
    step from an all-zero weight (a zero-initialised model's first) has no ratio: it is NaN in
    :meth:`after_step`'s result and left out of that layer's mean.
    """

    def __init__(self, weights: list[torch.Tensor]):
        self.weights = list(weights)
        self._prev: list[torch.Tensor] | None = None
        self.sums = torch.zeros(len(self.weights), dtype=torch.float64)
        self.counts = torch.zeros_like(self.sums)  # per layer: steps with a ratio
        self.count = 0  # steps
        self.total_sums = torch.zeros_like(self.sums)
        self.total_counts = torch.zeros_like(self.sums)
        self.total_count = 0

    @torch.no_grad()
    def before_step(self) -> None:
        self._prev = [w.detach().clone() for w in self.weights]

    @torch.no_grad()
    def after_step(self) -> torch.Tensor:
        if self._prev is None:
            raise RuntimeError("after_step() without before_step()")
        r = []
        for w, p in zip(self.weights, self._prev, strict=True):
            norm = float(torch.linalg.vector_norm(p))
            r.append(float(torch.linalg.vector_norm(w - p)) / norm if norm > 0 else math.nan)
        r = torch.tensor(r, dtype=torch.float64)
        self._prev = None
        have = ~torch.isnan(r)
        for sums, counts in ((self.sums, self.counts), (self.total_sums, self.total_counts)):
            sums += torch.where(have, r, 0.0)
            counts += have
        self.count += 1
        self.total_count += 1
        return r

    def mean(self, total: bool = False) -> list[float]:
        s, n = (self.total_sums, self.total_counts) if total else (self.sums, self.counts)
        return torch.where(n > 0, s / n.clamp(min=1), math.nan).tolist()

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()
        self.count = 0
