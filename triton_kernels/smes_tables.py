"""The device tables the SMES Triton kernels read, kept between steps (host side, no kernels).

One table (:class:`Tables`) per (device, dtypes, variant, block size, param storages, group
count): one int64 device buffer ``buf`` of ``n + G`` rows of 8 words (layout in
``smes_kernels``: a row per tensor with its addresses, ``n_elements`` and group index, then a
row per param group with its hyperparameters and lr source), a float32 ``scal`` buffer the
prologue kernel fills each step, and the int32 block map, built on the device.

A host mirror (numpy) holds what the device buffer holds. A step compares the new rows with it
and copies to the device only the row range that changed (new grad addresses, an lr schedule
touching a group row), through a ring of pinned staging buffers, each reused only once the copy
that read it has finished (an event on the device's current stream).

CUDA graphs: a table a captured graph reads is never written or freed again. A capture that
finds the table current takes it out of the LRU (frozen); one that needs other rows (a whole
training step captured after ``zero_grad(set_to_none=True)``: the grads live in the graph's
pool) gets a new device buffer filled by a captured copy from a pinned buffer set aside before
the capture, which the graph reads at every replay and nobody writes again.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses

import numpy as np
import torch

from . import smes_kernels as K

ROW = int(K.ROW)
COL_GROUP = int(K.COL_GROUP)
COL_NUMEL = int(K.COL_NUMEL)
COL_NROWS = int(K.COL_NROWS)
COL_ROW0 = int(K.COL_ROW0)
SCAL_COLS = int(K.SCAL_COLS)
STAGING_RING = 4


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the device's current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def device_guard(device: torch.device):
    """Make ``device`` current (Triton launches on the current device and its current stream)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


@dataclasses.dataclass
class Tables:
    key: tuple
    n: int  # tensor rows
    n_groups: int
    buf: torch.Tensor  # int64 [n + n_groups, ROW] on the device
    scal: torch.Tensor  # float32 [n, SCAL_COLS] on the device
    block_map: torch.Tensor  # int32 [n_blocks, 2] on the device
    n_blocks: int
    mirror: np.ndarray  # int64 [n + n_groups, ROW]: what buf holds
    staging: list = dataclasses.field(default_factory=list)  # pinned ring (CUDA only)
    events: list = dataclasses.field(default_factory=list)
    slot: int = 0
    graph_staging: torch.Tensor | None = None  # pinned, set aside for the next capture
    frozen: bool = False  # read by a captured graph: never written again
    sources: tuple = ()  # the lists the static rows were read from (identity)
    grad_ptrs: np.ndarray | None = None
    # The projection's row buffers (SPEC §4), float32 on the device: 4 sums per row (zeroed by
    # the decision kernel after reading them) and one coefficient per row.
    row_stats: torch.Tensor | None = None
    row_k: torch.Tensor | None = None
    group_rows: tuple | None = None
    group_index: list | None = None


def block_map_on_device(numels: list[int], block_size: int, device: torch.device):
    """(tensor index, block index) per program, int32 ``[n_blocks, 2]``, built on the device from
    the per-tensor block counts: no O(n_blocks) host list and no pageable copy."""
    counts_host = [(ne + block_size - 1) // block_size for ne in numels]
    n_blocks = sum(counts_host)
    counts = torch.tensor(counts_host, dtype=torch.int64).to(device, non_blocking=True)
    n = len(numels)
    tensor = torch.repeat_interleave(torch.arange(n, device=device), counts, output_size=n_blocks)
    first = torch.cumsum(counts, 0) - counts
    block = torch.arange(n_blocks, device=device) - first[tensor]
    return torch.stack((tensor, block), 1).to(torch.int32).contiguous(), n_blocks


class TableCache:
    """Tables by key, LRU-bounded; tables read by captured CUDA graphs are kept apart, forever.

    ``stats`` counts "builds" (new tables), "uploads" (host-to-device copies of changed rows),
    "rows" (rows copied), "launches" (kernel launches) and "graph_tables".
    """

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.graph_tables: list[Tables] = []
        self.stats = collections.Counter()
        self._defaults: dict = {}

    def defaults(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Persistent (grad_scale = 1, found_inf = 0) float32 scalars per device, each at a
        16-byte-aligned address, as a GradScaler's are (Triton specialises pointer arguments on
        16-byte alignment: a misaligned default would compile a second kernel)."""
        d = self._defaults.get(device)
        if d is None:
            buf = torch.zeros(8, dtype=torch.float32, device=device)  # a fill: capturable
            buf[0:1].fill_(1.0)
            d = self._defaults[device] = (buf[0:1], buf[4:5])
        return d

    def lookup(self, key) -> Tables | None:
        t = self.entries.get(key)
        if t is not None:
            self.entries.move_to_end(key)
        return t

    def frozen_for(self, key) -> Tables | None:
        """The newest table of ``key`` a graph reads (another capture may read it too)."""
        return next((t for t in reversed(self.graph_tables) if t.key == key), None)

    def build(
        self, key, numels: list[int], n_groups: int, device, block_size: int, proj_rows=None
    ) -> Tables:
        """A new table of ``len(numels)`` tensors and ``n_groups`` groups; rows not yet filled.
        ``rows``: the projection's rows per tensor (0: never projected), or None."""
        if capturing(device):
            raise RuntimeError(
                "smes_fused triton backend: the first step of these parameters is being captured "
                "in a CUDA graph; run an eager (warm-up) step before capturing, as "
                "torch.cuda.graphs asks, so the tables and the compiled kernels exist"
            )
        self.stats["builds"] += 1
        n = len(numels)
        rows = n + n_groups
        mirror = np.zeros((rows, ROW), dtype=np.int64)
        mirror[:n, COL_NUMEL] = numels
        total_rows = 0
        if proj_rows is not None:
            mirror[:n, COL_NROWS] = proj_rows
            mirror[:n, COL_ROW0] = np.cumsum([0, *proj_rows[:-1]]) if n else []
            total_rows = int(sum(proj_rows))
        buf = torch.zeros((rows, ROW), dtype=torch.int64, device=device)
        scal = torch.zeros((max(n, 1), SCAL_COLS), dtype=torch.float32, device=device)
        block_map, n_blocks = block_map_on_device(numels, block_size, device)
        t = Tables(key, n, n_groups, buf, scal, block_map, n_blocks, mirror)
        t.grad_ptrs = np.zeros(n, dtype=np.int64)
        if proj_rows is not None:
            t.row_stats = torch.zeros(4 * max(total_rows, 1), dtype=torch.float32, device=device)
            t.row_k = torch.zeros(max(total_rows, 1), dtype=torch.float32, device=device)
        if device.type == "cuda":
            t.staging = [_pinned(rows) for _ in range(STAGING_RING)]
            t.events = [None] * STAGING_RING
            t.graph_staging = _pinned(rows)
        self.entries[key] = t
        self._evict()
        return t

    def _evict(self) -> None:
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def freeze(self, t: Tables) -> None:
        """``t`` is read by a captured graph: never written again, never evicted."""
        if t.frozen:
            return
        t.frozen = True
        if self.entries.get(t.key) is t:
            del self.entries[t.key]
        self.graph_tables.append(t)
        self.stats["graph_tables"] += 1

    def graph_copy(self, t: Tables, mirror: np.ndarray) -> Tables:
        """A frozen copy of ``t`` holding ``mirror``, for a graph being captured: a new device
        buffer (the graph's pool) filled by a captured copy from ``t``'s set-aside pinned buffer,
        which becomes the graph's (read at every replay, never written again)."""
        device = t.buf.device
        if device.type != "cuda":  # the interpreter's tests: a plain host buffer
            t.graph_staging = torch.zeros(t.buf.shape, dtype=torch.int64)
        if t.graph_staging is None:
            raise RuntimeError(
                "smes_fused triton backend: a CUDA graph capture needs new tensor tables here, "
                "but none were prepared: run an eager step of this optimizer before each capture "
                "(torch.cuda.graphs asks for warm-up steps too)"
            )
        host, t.graph_staging = t.graph_staging, None
        host.numpy()[:] = mirror
        buf = torch.empty_like(t.buf)
        buf.copy_(host, non_blocking=True)
        g = dataclasses.replace(
            t,
            buf=buf,
            scal=torch.empty_like(t.scal),
            mirror=mirror,
            staging=[host],  # kept alive with the graph's table
            events=[],
            graph_staging=None,
            frozen=False,
        )
        self.stats["uploads"] += 1
        self.stats["rows"] += mirror.shape[0]
        self.freeze(g)
        return g

    def upload(self, t: Tables, lo: int, hi: int) -> None:
        """Copy rows ``[lo, hi)`` of the mirror to the device buffer, stream-ordered."""
        if hi <= lo:
            return
        assert not t.frozen
        self.stats["uploads"] += 1
        self.stats["rows"] += hi - lo
        device = t.buf.device
        if device.type != "cuda":
            t.buf[lo:hi] = torch.from_numpy(t.mirror[lo:hi])
            return
        if not t.staging:  # built during a capture (then frozen): never here
            t.staging = [_pinned(t.mirror.shape[0]) for _ in range(STAGING_RING)]
            t.events = [None] * STAGING_RING
        slot = t.slot
        t.slot = (slot + 1) % len(t.staging)
        host = t.staging[slot]
        ev = t.events[slot]
        if ev is not None:
            ev.synchronize()  # only waits if the GPU is len(staging) uploads behind
        host.numpy()[lo:hi] = t.mirror[lo:hi]
        stream = current_stream(device)
        with torch.cuda.stream(stream):
            t.buf[lo:hi].copy_(host[lo:hi], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(stream)
        t.events[slot] = ev

    def prepare_graph_staging(self, t: Tables) -> None:
        """Set a pinned buffer aside for a later capture (outside any capture)."""
        if t.graph_staging is None and t.buf.device.type == "cuda":
            t.graph_staging = _pinned(t.mirror.shape[0])


def _pinned(rows: int) -> torch.Tensor:
    return torch.zeros((rows, ROW), dtype=torch.int64, pin_memory=True)
