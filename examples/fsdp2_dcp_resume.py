"""FSDP2 + SMES + torch.distributed.checkpoint: train, save, resume, bit for bit.

    python examples/fsdp2_dcp_resume.py

Two processes (gloo on 127.0.0.1, CPU) shard a small MLP with FSDP2's ``fully_shard``; SMES
steps the local shards (its state is DTensors, like AdamW's). We train 3 steps, save model and
optimizer with ``torch.distributed.checkpoint`` into a temp dir, load them into a *fresh* model
and optimizer, train 3 more, and compare with 6 uninterrupted steps: the parameters are
bit-identical. On GPUs use backend "nccl", one device per rank, and torchrun.
"""

import datetime
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import smes_fused
from smes_fused import SMES

WORLD_SIZE = 2
STEPS_BEFORE, STEPS_AFTER = 3, 3
EXPONENT = -0.08
TIMEOUT_S = 60  # every collective, and the whole run, gives up after this


def make_model(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    for layer in model:  # shard each Linear (Shard(0) on dim 0), then the root
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def make_optimizer(model):
    # backend="auto" (the default) picks the fused C++ kernel on CPU; it runs on the local shards.
    return SMES(model.parameters(), exponent=EXPONENT, lr=smes_fused.lr_for_exponent(EXPONENT))


def train(model, opt, rank, first_step, steps):
    for step in range(first_step, first_step + steps):
        g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own data
        x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()  # FSDP2 averages the grads
        opt.step()


def full_params(model):
    return [p.full_tensor() for p in model.parameters()]  # gather the shards (a collective)


def resume_is_bit_identical(rank, ckpt_dir):
    """The demo proper, on one rank of an initialised process group."""
    # 1. The uninterrupted run.
    model = make_model(seed=0)
    opt = make_optimizer(model)
    train(model, opt, rank, 0, STEPS_BEFORE + STEPS_AFTER)
    straight = full_params(model)

    # 2. Train, then save model + optimizer state (each rank writes its own shards).
    model = make_model(seed=0)
    opt = make_optimizer(model)
    train(model, opt, rank, 0, STEPS_BEFORE)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir)
    del model, opt, model_sd, optim_sd

    # 3. A fresh model (another init) and optimizer: load into their state dicts, set, go on.
    model = make_model(seed=1)
    opt = make_optimizer(model)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, rank, STEPS_BEFORE, STEPS_AFTER)
    resumed = full_params(model)

    same = all(torch.equal(a, b) for a, b in zip(straight, resumed))
    if rank == 0:
        print(f"FSDP2, {WORLD_SIZE} ranks, SMES(exponent={EXPONENT}), default backend")
        print(
            f"resumed from a DCP checkpoint after {STEPS_BEFORE} of "
            f"{STEPS_BEFORE + STEPS_AFTER} steps"
        )
        print(f"bit-identical: {same}")
    return same


def worker(rank, port, ckpt_dir):
    torch.set_num_threads(1)  # 2 ranks on a small CPU
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),  # a lost peer raises, never hangs
    )
    try:
        if not resume_is_bit_identical(rank, ckpt_dir):
            raise SystemExit(1)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    with tempfile.TemporaryDirectory(prefix="smes_dcp_") as ckpt_dir:
        ctx = mp.spawn(worker, args=(free_port(), ckpt_dir), nprocs=WORLD_SIZE, join=False)
        try:
            # join() raises if a rank failed; False while ranks are still running.
            for _ in range(TIMEOUT_S * 2):
                if ctx.join(timeout=1):
                    return
            raise TimeoutError(f"ranks not done after {TIMEOUT_S * 2} s")
        finally:
            for p in ctx.processes:  # never leave a rank behind
                if p.is_alive():
                    p.kill()


if __name__ == "__main__":
    if sys.platform == "linux":  # gloo on the loopback interface only
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.exit(main())
