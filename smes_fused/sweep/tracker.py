"""Per-layer size of each optimizer step relative to the weight it updates."""

from __future__ import annotations

import math

import torch


class UpdateRatioTracker:
    """Per layer, ``||W_after - W_before|| / ||W_before||`` of each optimizer step.

    Call :meth:`before_step` just before ``optimizer.step()`` and :meth:`after_step` just after;
    :meth:`mean` averages the recorded steps (since the last :meth:`reset`, or all of them).
    """

    def __init__(self, weights: list[torch.Tensor]):
        self.weights = list(weights)
        self._prev: list[torch.Tensor] | None = None
        self.sums = torch.zeros(len(self.weights), dtype=torch.float64)
        self.count = 0
        self.total_sums = torch.zeros_like(self.sums)
        self.total_count = 0

    @torch.no_grad()
    def before_step(self) -> None:
        self._prev = [w.detach().clone() for w in self.weights]

    @torch.no_grad()
    def after_step(self) -> torch.Tensor:
        if self._prev is None:
            raise RuntimeError("after_step() without before_step()")
        r = torch.tensor(
            [
                float(torch.linalg.vector_norm(w - p) / torch.linalg.vector_norm(p))
                for w, p in zip(self.weights, self._prev, strict=True)
            ],
            dtype=torch.float64,
        )
        self._prev = None
        self.sums += r
        self.count += 1
        self.total_sums += r
        self.total_count += 1
        return r

    def mean(self, total: bool = False) -> list[float]:
        s, n = (self.total_sums, self.total_count) if total else (self.sums, self.count)
        return (s / n).tolist() if n else [math.nan] * len(self.weights)

    def reset(self) -> None:
        self.sums.zero_()
        self.count = 0
