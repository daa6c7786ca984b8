"""The snapshot: host copies of the state's tensors, taken before `save()` returns.

All entries of a save are copied into one uint8 *staging buffer* laid out exactly like
the data section of the safetensors payload, so the writer streams it to disk without
another copy. Buffers are kept and reused by later saves of the same size or smaller;
the first save pays for faulting the pages in.

CUDA: the staging buffer is pinned and the copies are issued non-blocking on the
caller's current stream, followed by an event; the writer thread waits on that event
before reading, so the caller's next kernels are ordered after the copy and `save()`
returns without synchronising the device.

CPU: when torch's intra-op threads leave cores unused (a trainer that keeps cores free for
the writer, `torch.set_num_threads(cores - 1)`), the copy of CPU tensors is split across
helper threads on those cores: a single-threaded copy of 100 MB took 15 ms here, two
threads 7 ms, and `save()` blocks for exactly that copy. When torch already runs on every
core its own copy kernel is parallel, and helpers would only oversubscribe the cores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from ._layout import Entry, Plan
from ._workers import WorkerPool

# A CPU copy is cut into pieces of about this size, so that lanes come out even.
COPY_PIECE = 8 << 20
# Below this many bytes a parallel copy costs more in hand-offs than it saves.
PARALLEL_COPY_MIN = 16 << 20


class StagingPool:
    """Reusable host buffers; at most `keep` idle ones are held."""

    def __init__(self, keep: int = 2) -> None:
        self._free: list[torch.Tensor] = []
        self._keep = keep
        self._lock = threading.Lock()

    def acquire(self, nbytes: int, pinned: bool) -> torch.Tensor:
        with self._lock:
            fits = [
                i
                for i, b in enumerate(self._free)
                if b.numel() >= nbytes and b.is_pinned() == pinned
            ]
            if fits:
                # By index, never list.remove: that compares tensors with ==, elementwise.
                best = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
                return best[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

    def release(self, buffer: torch.Tensor) -> None:
        base = buffer._base if buffer._base is not None else buffer
        with self._lock:
            self._free.append(base)
            self._free.sort(key=lambda b: b.numel(), reverse=True)
            del self._free[self._keep :]

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


@dataclass
class Snapshot:
    plan: Plan
    buffer: torch.Tensor  # uint8, the payload's data section
    ready: torch.cuda.Event | None  # set when copies from a GPU are in flight

    def wait_ready(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def entry_view(self, entry: Entry) -> memoryview:
        data = self.buffer[entry.offset : entry.offset + entry.nbytes]
        array: Any = data.numpy()
        return memoryview(array).cast("B")


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def copy_entry(target: torch.Tensor, entry: Entry, non_blocking: bool) -> None:
    """Copy an entry's tensor into `target`, a uint8 slice of exactly its size."""
    source = entry.source
    if entry.nbytes == 0:
        return
    if source.dtype == torch.bool:
        # A bool copy kernel turns every non-zero byte into 1; a checkpoint keeps bytes.
        source = source.view(torch.uint8)
    if source.dtype == torch.uint8:
        target.copy_(source.reshape(-1), non_blocking=non_blocking)
        return
    try:
        typed = target.view(source.dtype).view(source.shape)
        typed.copy_(source, non_blocking=non_blocking)
    except (RuntimeError, NotImplementedError):
        # Dtypes without a copy kernel (uint1..7, int1..7, views as qint8, ...) copy as
        # same-sized integers: a view to an equal-sized dtype keeps any strides, where
        # `source.contiguous()` would need the missing kernel itself.
        as_int = _SAME_SIZE_INT[source.element_size()]
        typed = target.view(as_int).view(source.shape)
        typed.copy_(source.view(as_int), non_blocking=non_blocking)


def _cpu_pieces(target: torch.Tensor, entry: Entry) -> list[Callable[[], None]]:
    """Copies that together fill `target` from a CPU entry: pieces of a contiguous
    tensor, or the whole entry when its layout does not cut into flat pieces."""
    source = entry.source
    if source.dtype == torch.bool:
        source = source.view(torch.uint8)
    if entry.nbytes <= COPY_PIECE or not source.is_contiguous():
        return [lambda: copy_entry(target, entry, non_blocking=False)]
    flat_source = source.reshape(-1).view(torch.uint8)

    def piece(at: int) -> Callable[[], None]:
        def copy() -> None:
            target[at : at + COPY_PIECE].copy_(flat_source[at : at + COPY_PIECE])

        return copy

    return [piece(at) for at in range(0, entry.nbytes, COPY_PIECE)]


class _CopyHelpers:
    """Daemon threads for parallel CPU copies, made on first use and again after a fork
    (a forked child has none of its parent's threads)."""

    def __init__(self) -> None:
        self._pool: WorkerPool | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def count(self) -> int:
        """Cores torch's intra-op threads leave unused."""
        return max(0, (os.cpu_count() or 1) - torch.get_num_threads())

    def run(self, jobs: list[Callable[[], None]], helpers: int) -> None:
        """Run `jobs`: `helpers` lanes on helper threads, one on the calling thread."""
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = WorkerPool(max(1, (os.cpu_count() or 1) - 1), "ckptstore-copy")
                self._pid = os.getpid()
            pool = self._pool
        lanes: list[list[Callable[[], None]]] = [[] for _ in range(min(helpers, pool.threads) + 1)]
        for i, job in enumerate(jobs):
            lanes[i % len(lanes)].append(job)
        futures: list[Future[None]] = [pool.submit(_run_all(lane)) for lane in lanes[1:]]
        error: BaseException | None = None
        try:
            for job in lanes[0]:
                job()
        except BaseException as caught:  # the helpers' copies must end before we return
            error = caught
        for future in futures:
            try:
                future.result()
            except BaseException as caught:
                error = error or caught
        if error is not None:
            raise error


def _run_all(jobs: list[Callable[[], None]]) -> Callable[[], None]:
    def run() -> None:
        for job in jobs:
            job()

    return run


_helpers = _CopyHelpers()


def take(plan: Plan, pool: StagingPool) -> Snapshot:
    """Copy every entry of `plan` into a staging buffer; returns once the copy is safe."""
    on_gpu = any(e.source.device.type == "cuda" for e in plan.entries)
    buffer = pool.acquire(plan.data_size, pinned=on_gpu and torch.cuda.is_available())
    helpers = _helpers.count() if plan.data_size >= PARALLEL_COPY_MIN else 0
    cpu_jobs: list[Callable[[], None]] = []
    for entry in plan.entries:
        target = buffer[entry.offset : entry.offset + entry.nbytes]
        if helpers and entry.source.device.type == "cpu" and entry.nbytes:
            cpu_jobs.extend(_cpu_pieces(target, entry))
        else:
            copy_entry(target, entry, non_blocking=entry.source.device.type == "cuda")
    if cpu_jobs:
        _helpers.run(cpu_jobs, helpers)
    ready = None
    if on_gpu:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream())
    # Drop the references to the caller's tensors: the snapshot must not keep them alive.
    for entry in plan.entries:
        entry.source = buffer[entry.offset : entry.offset + entry.nbytes]
    return Snapshot(plan, buffer, ready)
