"""Stochastic rounding of float32 to bfloat16 (SPEC §4), the one definition every backend follows.

A float32 value whose 16 low bits are ``b`` rounds up to the next bfloat16 with probability
``b / 2^16`` and down otherwise: ``bf16 = (bits(x) + r) >> 16`` with ``r`` uniform in
[0, 2^16), so the rounding is unbiased (E[bf16] = x). ``r`` is a counter-based hash, the same in
every backend and reproducible from the seed and the step:

    seed' = seed ^ mix(mix(mix(position + 1) ^ hi(offset)) ^ lo(offset))    (once per tensor)
    key   = mix(seed' ^ mix(step · 0x9E3779B9))                             (uint32 arithmetic)
    r     = mix(key ^ lo(index) ^ mix(hi(index))) & 0xFFFF

where ``mix`` is MurmurHash3's 32-bit finaliser, ``seed`` the param group's ``rounding_seed``,
``position`` the param's place in its optimizer (``SMES``: in the flat list of every group's
params; ``smes()``: in ``params``), ``offset`` the place of a shard's first element in the whole
param (0 unless the param is a DTensor: shards draw their own noise, replicas of a shard the
same), ``step`` the step count of this step (1 on the first) and ``index`` the element's place
in memory from the param's first element (row-major for a contiguous param, memory order for a
dense one such as channels_last: the order the kernels walk). Non-finite values round to nearest
(NaN stays NaN, ±inf stays ±inf). A bucket carries each tensor's salt (:func:`tensor_salt`,
``Bucket.salts``, fixed when it is built) and the backends read ``seed'`` per tensor, so a
kernel's key does not depend on how a bucket is split into launches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_kernels.smes_checks import dense  # (torch only: no triton import)

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def mix(x):
    """MurmurHash3's fmix32 on Python ints or int64 tensors holding uint32 values."""
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def tensor_salt(position: int, offset: int = 0) -> int:
    """What a tensor's seed (``seed'`` above) is its group's ``rounding_seed`` XOR'ed with: from
    the param's position in its optimizer and, for a shard, its first element's offset."""
    return mix(mix(mix(position + 1) ^ (offset >> 32)) ^ (offset & M32))


def tensor_key(seed: int, step):
    """The key of one step from a tensor's seed: a Python int, or an int64 tensor if ``step`` is
    one."""
    if isinstance(step, Tensor):
        step = step.to(torch.int64)
    else:
        step = int(step)
    return mix(seed ^ mix(step * GOLDEN))


def element_index(p: Tensor) -> Tensor:
    """Each element's ``index``: its place in memory from the first element (int64, p's shape).
    A dense param is walked in memory order by the kernels (channels_last, a transposed leaf);
    one that is not dense (no kernel walks it) counts row-major."""
    idx = torch.arange(p.numel(), dtype=torch.int64, device=p.device)
    if p.is_contiguous() or not dense(p):
        return idx.view(p.shape)
    return idx.as_strided(p.shape, p.stride())


def round_to_bf16(x: Tensor, key, like: Tensor | None = None) -> Tensor:
    """``x`` (float32) stochastically rounded to bfloat16 with the given key; the elements'
    indices are those of ``like`` (the param, :func:`element_index`), by default of ``x``."""
    idx = element_index(x if like is None else like)
    x = x.float()
    r = mix(key ^ (idx & M32) ^ mix(idx >> 32)) & 0xFFFF
    bits = x.view(torch.int32).to(torch.int64) & M32
    up = ((bits + r) >> 16) & 0xFFFF
    out = up.to(torch.int32).to(torch.int16).view(torch.bfloat16)  # the low 16 bits
    return torch.where(torch.isfinite(x), out, x.to(torch.bfloat16))
