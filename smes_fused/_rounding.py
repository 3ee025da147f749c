"""Stochastic rounding of float32 to bfloat16 (SPEC §4), the one definition every backend follows.

A float32 value whose 16 low bits are ``b`` rounds up to the next bfloat16 with probability
``b / 2^16`` and down otherwise: ``bf16 = (bits(x) + r) >> 16`` with ``r`` uniform in
[0, 2^16), so the rounding is unbiased (E[bf16] = x). ``r`` is a counter-based hash, the same in
every backend and reproducible from the seed and the step:

    key = mix(seed ^ mix(step · 0x9E3779B9 + tensor))    (uint32 arithmetic)
    r   = mix(key ^ lo(index) ^ mix(hi(index))) & 0xFFFF

where ``mix`` is MurmurHash3's 32-bit finaliser, ``step`` the step count of this step (1 on the
first), ``tensor`` the tensor's position in its bucket and ``index`` the element's (64-bit).
Non-finite values round to nearest (NaN stays NaN, ±inf stays ±inf).

A shard of a sharded param (a DTensor: FSDP2, tensor parallel) indexes its own elements from 0,
so it rounds with its own seed, :func:`shard_seed` of the group's seed and the shard's offset
in the whole param: shards draw independent noise, and replicas of one shard the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

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


def tensor_key(seed: int, step, tensor: int):
    """The per-tensor key of one step: a Python int, or an int64 tensor if ``step`` is one."""
    if isinstance(step, Tensor):
        step = step.to(torch.int64)
    else:
        step = int(step)
    return mix(seed ^ mix(step * GOLDEN + tensor))


def shard_seed(seed: int, offset: int) -> int:
    """The seed of a shard whose first element is element ``offset`` of the whole param
    (row-major): ``seed ^ mix(lo(offset) ^ mix(hi(offset)))``; ``seed`` itself at offset 0
    (mix(0) = 0), so an unsharded or replicated param keeps it."""
    return seed ^ mix((offset & M32) ^ mix(offset >> 32))


def round_to_bf16(x: Tensor, key) -> Tensor:
    """``x`` (float32) stochastically rounded to bfloat16 with the given key."""
    x = x.float().contiguous()
    idx = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
    r = mix(key ^ (idx & M32) ^ mix(idx >> 32)) & 0xFFFF
    bits = x.view(torch.int32).to(torch.int64) & M32
    up = ((bits + r) >> 16) & 0xFFFF
    out = up.to(torch.int32).to(torch.int16).view(torch.bfloat16)  # the low 16 bits
    return torch.where(torch.isfinite(x), out, x.to(torch.bfloat16))
