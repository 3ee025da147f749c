"""Shape sets: the parameter shapes the optimizer steps over.

Model shapes come from small ``torch.nn`` definitions built on the meta device (shapes, no
memory), written from the architectures' papers and reference implementations; nothing is
downloaded. Each builder takes a ``scale``:

- ``"full"``: the whole model (the parameter counts in ``FULL_PARAMS``);
- ``"default"``: a subset of the model's real shapes (fewer blocks or layers) so that the default
  run finishes in a few minutes on a 2-core CPU;
- ``"quick"``: tiny sets for the smoke test (model builders treat it as ``"default"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

# Whole-model parameter counts (checked in tests/test_bench.py against the builders).
FULL_PARAMS = {
    "resnet50": 25_557_032,
    "vgg16": 138_357_544,
    "vit_b_16": 86_567_656,
    "gpt2": 124_439_808,
}


@dataclasses.dataclass(frozen=True)
class ShapeSet:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    source: str  # where the shapes come from and what subset was taken

    @property
    def n_params(self) -> int:
        return sum(torch.Size(s).numel() for s in self.shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)


def _shapes(module: nn.Module) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(p.shape) for p in module.parameters())


def _meta(build: Callable[[], nn.Module]) -> tuple[tuple[int, ...], ...]:
    with torch.device("meta"):
        return _shapes(build())


# --- ResNet-50 (He et al. 2016; torchvision.models.resnet50 layout, v1.5 stride placement) ---


def _bottleneck(cin: int, width: int, stride: int) -> nn.Module:
    cout = 4 * width
    layers = [
        nn.Conv2d(cin, width, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.Conv2d(width, width, 3, stride, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.Conv2d(width, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if stride != 1 or cin != cout:  # projection shortcut
        layers += [nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers)


def _resnet50() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(_bottleneck(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    layers.append(nn.Linear(2048, 1000))
    return nn.Sequential(*layers)


def resnet50(scale: str) -> ShapeSet:
    return ShapeSet("resnet50", _meta(_resnet50), "ResNet-50, whole model (He et al. 2016)")


# --- VGG-16 (Simonyan & Zisserman 2015, configuration D; torchvision.models.vgg16) ---

_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _vgg16(classifier: bool) -> nn.Module:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG16_CFG:
        if v != "M":
            layers.append(nn.Conv2d(cin, v, 3, padding=1))
            cin = v
    if classifier:
        layers += [nn.Linear(512 * 7 * 7, 4096), nn.Linear(4096, 4096), nn.Linear(4096, 1000)]
    return nn.Sequential(*layers)


def vgg16(scale: str) -> ShapeSet:
    if scale == "full":
        return ShapeSet("vgg16", _meta(lambda: _vgg16(True)), "VGG-16, whole model")
    return ShapeSet(
        "vgg16",
        _meta(lambda: _vgg16(False)),
        "VGG-16 conv layers only (13 convs; the 3 FC layers, 124M params, are in --full)",
    )


# --- Pre-norm transformer blocks: ViT-B/16 and GPT-2 small share the block's shapes ---


def _block(d: int, heads: int, ffn: int) -> nn.Module:
    # in_proj (3d, d) + out_proj, 2 LayerNorms, 2 MLP linears: the parameter shapes of a
    # torchvision EncoderBlock and of a GPT-2 block (whose Conv1D stores the same weights
    # transposed, which changes nothing for an elementwise optimizer).
    return nn.TransformerEncoderLayer(d, heads, ffn, norm_first=True, batch_first=True)


def _vit_b_16(depth: int) -> nn.Module:
    m = nn.Module()
    m.conv_proj = nn.Conv2d(3, 768, 16, 16)
    m.class_token = nn.Parameter(torch.empty(1, 1, 768))
    m.pos_embedding = nn.Parameter(torch.empty(1, 197, 768))
    m.layers = nn.Sequential(*[_block(768, 12, 3072) for _ in range(depth)])
    m.ln = nn.LayerNorm(768)
    m.head = nn.Linear(768, 1000)
    return m


def vit_b_16(scale: str) -> ShapeSet:
    depth = 12 if scale == "full" else 2
    what = "whole model" if depth == 12 else "embeddings, 2 of 12 encoder blocks, head"
    return ShapeSet(
        "vit_b_16",
        _meta(lambda: _vit_b_16(depth)),
        f"ViT-B/16 (Dosovitskiy et al. 2021; torchvision vit_b_16), {what}",
    )


def _gpt2(depth: int, token_embedding: bool) -> nn.Module:
    m = nn.Module()
    if token_embedding:
        m.wte = nn.Embedding(50257, 768)  # tied with the LM head: counted once
    m.wpe = nn.Embedding(1024, 768)
    m.h = nn.Sequential(*[_block(768, 12, 3072) for _ in range(depth)])
    m.ln_f = nn.LayerNorm(768)
    return m


def gpt2(scale: str) -> ShapeSet:
    if scale == "full":
        return ShapeSet("gpt2", _meta(lambda: _gpt2(12, True)), "GPT-2 small, whole model")
    return ShapeSet(
        "gpt2",
        _meta(lambda: _gpt2(2, False)),
        "GPT-2 small (Radford et al. 2019; HF gpt2), 2 of 12 blocks + wpe + ln_f "
        "(wte 50257x768 only in --full)",
    )


# --- LLaMA-style decoder layers (Touvron et al. 2023): RMSNorm, SwiGLU MLP, no biases ---


def _llama_layer(d: int, ffn: int) -> nn.Module:
    m = nn.Module()
    m.input_layernorm = nn.RMSNorm(d)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(m, name, nn.Linear(d, d, bias=False))
    m.post_attention_layernorm = nn.RMSNorm(d)
    m.gate_proj = nn.Linear(d, ffn, bias=False)
    m.up_proj = nn.Linear(d, ffn, bias=False)
    m.down_proj = nn.Linear(ffn, d, bias=False)
    return m


def llama(scale: str) -> ShapeSet:
    # LLaMA-7B is d=4096, ffn=11008, 32 layers (202M params per layer). Its width is scaled
    # down, keeping the ffn/d ratio, so that the set fits this machine's time and memory
    # (every competitor holds its own state).
    d, ffn, layers = (2048, 5504, 4) if scale == "full" else (1024, 2752, 2)
    return ShapeSet(
        "llama",
        _meta(lambda: nn.Sequential(*[_llama_layer(d, ffn) for _ in range(layers)])),
        f"LLaMA-style decoder layers, LLaMA-7B shapes at width {d}/4096 (ffn {ffn}), "
        f"{layers} layers",
    )


# --- Synthetic sets ---


def large(scale: str) -> ShapeSet:
    n = 1 << 20 if scale == "quick" else 1 << 24
    return ShapeSet("large", ((n,),), f"one tensor of {n:,} elements")


def many_small(scale: str) -> ShapeSet:
    count, size = (256, 4096) if scale == "quick" else (2000, 8192)
    return ShapeSet("many_small", ((size,),) * count, f"{count} tensors of {size} elements")


BUILDERS: dict[str, Callable[[str], ShapeSet]] = {
    "resnet50": resnet50,
    "vgg16": vgg16,
    "vit_b_16": vit_b_16,
    "gpt2": gpt2,
    "llama": llama,
    "large": large,
    "many_small": many_small,
}
QUICK_SETS = ("large", "many_small")


def shape_set(name: str, scale: str) -> ShapeSet:
    return BUILDERS[name](scale)
