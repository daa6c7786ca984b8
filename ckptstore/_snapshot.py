"""The snapshot: host copies of the state's tensors, taken before `save()` returns.

All entries of a save are copied into one uint8 *staging buffer* laid out exactly like
the data section of the safetensors payload, so the writer streams it to disk without
another copy. Buffers are kept and reused by later saves of the same size or smaller;
the first save pays for faulting the pages in.

CUDA: the staging buffer is pinned and the copies are issued non-blocking on the
caller's current stream, followed by an event; the writer thread waits on that event
before reading, so the caller's next kernels are ordered after the copy and `save()`
returns without synchronising the device.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from ._layout import Entry, Plan


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


def take(plan: Plan, pool: StagingPool) -> Snapshot:
    """Copy every entry of `plan` into a staging buffer; returns once the copy is safe."""
    on_gpu = any(e.source.device.type == "cuda" for e in plan.entries)
    buffer = pool.acquire(plan.data_size, pinned=on_gpu and torch.cuda.is_available())
    for entry in plan.entries:
        target = buffer[entry.offset : entry.offset + entry.nbytes]
        copy_entry(target, entry, non_blocking=entry.source.device.type == "cuda")
    ready = None
    if on_gpu:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream())
    # Drop the references to the caller's tensors: the snapshot must not keep them alive.
    for entry in plan.entries:
        entry.source = buffer[entry.offset : entry.offset + entry.nbytes]
    return Snapshot(plan, buffer, ready)
