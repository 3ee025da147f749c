"""Bounded multi-process runs on 127.0.0.1 (gloo), shared by the distributed tests.

``run_ranks(fn, *args)`` spawns ``world_size`` processes, each of which joins a gloo process
group on 127.0.0.1 (a free port chosen at run time), calls ``fn(rank, world_size, *args)`` and
sends back what it returns. Everything is bounded: the process group has a timeout, so a rank
waiting on a peer that failed raises instead of hanging, and the parent kills every rank still
alive at ``timeout`` seconds and raises. No rank outlives the call.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback

import torch.multiprocessing as mp

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, pg_timeout, out_dir, fn, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # 2 ranks on a 2-core runner: no oversubscription
    if sys.platform == "linux":  # gloo on the loopback interface only
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result: object
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{HOST}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        try:
            result = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:  # sent back to the parent, which raises it with the rank's traceback
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


class RankError(RuntimeError):
    pass


def run_ranks(fn, *args, world_size: int = 2, timeout: float = 120.0, pg_timeout: float = 60.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results.

    ``fn`` must be importable by name (a module-level function) and its results picklable
    (tensors are fine). Raises :class:`RankError` with every failing rank's traceback, or
    :class:`TimeoutError` (after killing the ranks) if they are not done in ``timeout`` s.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="smes_dist_") as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(world_size, port, pg_timeout, out_dir, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = _now() + timeout
        try:
            while not ctx.join(timeout=max(0.0, min(1.0, deadline - _now()))):
                if _now() >= deadline:
                    raise TimeoutError(f"{fn.__name__}: ranks not done after {timeout:.0f} s")
        except mp.ProcessRaisedException:  # not expected: _entry catches everything
            raise
        except mp.ProcessExitedException as e:  # a rank died (signal, os._exit)
            raise RankError(str(e)) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"--- rank {r} ---\n{value}")
            results.append(value)
        if errors:
            raise RankError(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return results


def _now() -> float:
    return time.monotonic()
