"""The sweep's models; each lists its weight layers from input to output (``weight_layers``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data import Dataset


class SmallVGG(nn.Module):
    """conv-conv-pool blocks then a two-layer classifier; ``2*len(widths) + 2`` weight layers."""

    def __init__(
        self,
        in_channels: int,
        size: int,
        n_classes: int,
        widths: tuple[int, ...] = (16, 32),
        hidden: int = 64,
        batchnorm: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            for _ in range(2):
                layers.append(nn.Conv2d(c, w, 3, padding=1, bias=not batchnorm))
                if batchnorm:
                    layers.append(nn.BatchNorm2d(w))
                layers.append(nn.ReLU(inplace=True))
                c = w
            layers.append(nn.MaxPool2d(2))
            size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))

    def weight_layers(self) -> list[tuple[str, torch.Tensor]]:
        """(name, weight) of every conv/linear layer, from input to output."""
        return _weight_layers(self)


def _weight_layers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out, n_conv, n_fc = [], 0, 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n_conv += 1
            out.append((f"conv{n_conv}", m.weight))
        elif isinstance(m, nn.Linear):
            n_fc += 1
            out.append((f"fc{n_fc}", m.weight))
    return out


class MLP(nn.Module):
    """``depth`` linear layers (``depth - 1`` hidden ReLU layers of ``width``) on flat input."""

    def __init__(
        self, in_features: int, n_classes: int, depth: int = 8, width: int = 256, batchnorm=False
    ):
        super().__init__()
        if depth < 2:
            raise ValueError(f"an MLP needs depth >= 2, got {depth}")
        layers: list[nn.Module] = [nn.Flatten()]
        c = in_features
        for _ in range(depth - 1):
            layers.append(nn.Linear(c, width, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            c = width
        layers.append(nn.Linear(c, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)

    def weight_layers(self) -> list[tuple[str, torch.Tensor]]:
        """(name, weight) of every linear layer, ``fc1`` (input) to ``fc<depth>`` (output)."""
        return _weight_layers(self)


class WilsonLinear(nn.Module):
    """The linear model ``f(x) = <w, x>`` of Wilson et al.'s construction, started at w = 0.

    ``w`` is stored as three parameters, one per feature group of
    :func:`smes_fused.sweep.data.wilson_features`, so that the per-layer profile becomes a
    per-group one: ``label`` (column 0), ``const`` (columns 1-2), ``unique`` (the examples' own
    blocks). SMES acts elementwise with one step count per parameter, so the split changes no
    update. No bias: columns 1-2 play its part, as in the paper.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.label = nn.Parameter(torch.zeros(1))
        self.const = nn.Parameter(torch.zeros(2))
        self.unique = nn.Parameter(torch.zeros(in_features - 3))

    def forward(self, x):
        return x @ torch.cat([self.label, self.const, self.unique])  # one contiguous mat-vec

    def weight_layers(self) -> list[tuple[str, torch.Tensor]]:
        return [("label", self.label), ("const", self.const), ("unique", self.unique)]

    @torch.no_grad()
    def solution(self) -> dict[str, float]:
        """The weights that decide a new example's prediction ``y w_label + w_const``.

        ``margin`` is the smallest ``y f(x) / ||w||`` over new examples of both labels,
        ``(w_label - |w_const|) / ||w||``: positive iff every new example is classified right.
        """
        w_label, w_const = float(self.label[0]), float(self.const.sum())
        norm = float(torch.cat([self.label, self.const, self.unique]).norm())
        return {
            "w_label": w_label,
            "w_const": w_const,
            "w_unique_norm": float(self.unique.norm()),
            "margin": (w_label - abs(w_const)) / norm if norm > 0 else 0.0,
        }


MODELS = ("vgg", "mlp")
INITS = ("torch", "he")


def he_init_(model: nn.Module) -> nn.Module:
    """He initialisation of every conv/linear weight (normal, fan-in, ReLU gain), zero biases.

    It keeps the signal's scale through a ReLU stack without BatchNorm. torch's default (uniform
    with variance 1/(3 fan-in)) shrinks the signal's standard deviation about 0.4x a layer there,
    which leaves the early layers with tiny gradients; with BatchNorm the two differ little.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def build_model(
    data: Dataset,
    batchnorm: bool = True,
    model: str = "vgg",
    mlp_depth: int = 8,
    mlp_width: int = 256,
    init: str | None = None,
) -> nn.Module:
    """The model for ``data``: the small VGG or the MLP; Wilson's data always get the linear one.

    VGG sizes: two blocks (16, 32 channels) and 64 hidden units up to 28x28 input (digits,
    MNIST: 6 weight layers), three blocks (32, 64, 128) and 256 hidden above (CIFAR: 8).
    ``init``: ``"torch"`` (torch's default) or ``"he"`` (:func:`he_init_`); None picks torch's
    with BatchNorm and He's without.
    """
    if data.loss == "squared":
        return WilsonLinear(data.x_train.shape[1])
    init = init or ("torch" if batchnorm else "he")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if model == "mlp":
        n_in = int(np.prod(data.x_train.shape[1:]))
        net = MLP(n_in, data.n_classes, mlp_depth, mlp_width, batchnorm)
    elif model != "vgg":
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    elif data.size <= 28:
        net = SmallVGG(data.in_channels, data.size, data.n_classes, (16, 32), 64, batchnorm)
    else:
        net = SmallVGG(data.in_channels, data.size, data.n_classes, (32, 64, 128), 256, batchnorm)
    return he_init_(net) if init == "he" else net
