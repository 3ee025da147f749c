"""Running the grid of (p, lr, seed) runs, in this process or in a pool of workers."""

from __future__ import annotations

import torch

from .data import Dataset
from .training import Config, train_run

# Every run uses one intra-op thread, whatever --jobs: the models are tiny (threads only add
# overhead, and spin-waiting threads are very slow on a shared machine), and a fixed thread count
# keeps a run's result bitwise the same whichever process runs it.
_WORKER: dict = {}


def _init_worker(data: Dataset | dict[int, Dataset], cfg: Config, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["data"], _WORKER["cfg"] = data, cfg


def _run_job(job):
    p, lr, seed = job
    data = _WORKER["data"]
    data = data[seed] if isinstance(data, dict) else data
    return train_run(data, p, lr, seed, _WORKER["cfg"])


def run_grid(data: Dataset | dict[int, Dataset], cfg: Config, jobs: int, progress: bool = True):
    """Every (p, lr, seed) of the grid; returns (summaries, epoch rows) in grid order.

    ``data`` is one data set for every seed, or one per seed (Wilson's: a draw per seed)."""
    from tqdm import tqdm

    grid = [
        (p, cfg.grid_centre(p) * m, s)
        for p in cfg.exponents
        for m in cfg.lr_mults
        for s in cfg.seeds
    ]
    bar = tqdm(total=len(grid), desc="SMES balance sweep", unit="run", disable=not progress)
    results: dict = {}
    if jobs <= 1:
        threads = torch.get_num_threads()
        _init_worker(data, cfg, 1)
        try:
            for job in grid:
                bar.set_postfix_str(f"p={job[0]:g} lr={job[1]:.3g} seed={job[2]}")
                results[job] = _run_job(job)
                bar.update()
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(jobs, _init_worker, (data, cfg, 1)) as pool:
            # Longest-first is not knowable; the grid order interleaves p values well enough.
            for job, res in zip(grid, pool.imap(_run_job, grid), strict=True):
                results[job] = res
                bar.set_postfix_str(f"p={job[0]:g}")
                bar.update()
    bar.close()
    summaries = [results[j][0] for j in grid]
    epochs = [row for j in grid for row in results[j][1]]
    return summaries, epochs
