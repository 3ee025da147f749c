"""The sweep's model: a small VGG whose weight layers are listed from input to output."""

from __future__ import annotations

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
        out, n_conv, n_fc = [], 0, 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n_conv += 1
                out.append((f"conv{n_conv}", m.weight))
            elif isinstance(m, nn.Linear):
                n_fc += 1
                out.append((f"fc{n_fc}", m.weight))
        return out


def build_model(data: Dataset, batchnorm: bool = True) -> SmallVGG:
    if data.size <= 8:
        return SmallVGG(data.in_channels, data.size, data.n_classes, (16, 32), 64, batchnorm)
    return SmallVGG(data.in_channels, data.size, data.n_classes, (32, 64, 128), 256, batchnorm)
