"""``"cuda"``: the compiled CUDA multi-tensor kernel (csrc/smes_cuda.cu), Triton's fallback.

One launch per variant present in the bucket (usually one in all) covers every tensor of every
param group; hyperparameters travel per tensor in the launch's metadata. Step counts, ``lr``
tensors, ``grad_scale`` and ``found_inf`` are read on the device: no host sync, capturable.
"""

from __future__ import annotations

import torch

from .. import _ops
from .._bucket import Bucket, BucketKey
from . import register
from .cpu import HyperTable

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CudaBackend:
    name = "cuda"
    steps_on_device = True

    def __init__(self) -> None:
        self._tables: dict = {}

    def unavailable(self) -> str | None:
        why = _ops.unavailable_reason()
        if why is not None:
            return why
        if not _ops.has_cuda_kernels():
            return (
                "smes_fused._C was built without its CUDA kernels (it needs a CUDA build of torch "
                "and nvcc/CUDA_HOME at build time, and SMES_BUILD_CUDA not 0); rebuild with "
                f"`{_ops.BUILD_COMMAND}`"
            )
        return None

    def cannot_run(self, key: BucketKey) -> str | None:
        if key.device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only, not {key.device}"
        if key.param_dtype not in _PARAM_DTYPES:
            return f"params of dtype {key.param_dtype} (supported: float32, bfloat16, float16)"
        if key.state_dtype not in (torch.float32, key.param_dtype):
            return f"state dtype {key.state_dtype} (supported: float32 or the param dtype)"
        return None

    def __call__(self, bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
        if len(bucket) == 0:
            return
        tab = self._tables.get(bucket.key)
        if tab is None:
            tab = self._tables[bucket.key] = HyperTable("cuda")
        hypers = tab.update(bucket.hypers)
        _ops.smes_step_(
            bucket.params,
            bucket.grads,
            bucket.exp_avgs,
            bucket.exp_avg_sqs,
            bucket.max_exp_avg_sqs,
            bucket.steps,
            hypers,
            tab.lrs,
            grad_scale,
            found_inf,
        )


register(CudaBackend())
