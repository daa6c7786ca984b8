"""Open a checkpoint and load its state, checking everything before handing it out.

Nothing here unpickles: the state is rebuilt from the manifest's JSON skeleton and
the payload's raw bytes. Every size and offset comes from the parsed (and bounded)
manifest; each entry's bytes are checked against their checksum before any tensor
built on them is returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ._format import PayloadReader
from ._layout import dtype_from_name
from ._manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    EntryRecord,
    Manifest,
    TensorRecord,
    decode_manifest,
    hash_bytes,
    parse_manifest,
)
from ._storage import Storage
from ._tree import select, tensor_names, unflatten
from ._workers import WorkerPool
from .errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError

MapLocation = str | torch.device | None


# Jobs in flight per worker while restoring: results come back in order, so a long
# decode at the head must not leave the other workers without work.
READ_AHEAD = 4


def _run_in_order(
    jobs: list[tuple[int, Callable[[], None]]], pool: WorkerPool | None
) -> Iterator[int]:
    """Run each (tag, job); yield the tags in job order as the jobs finish."""
    if pool is None or len(jobs) < 2:
        for tag, job in jobs:
            job()
            yield tag
        return

    def run(item: tuple[int, Callable[[], None]]) -> int:
        item[1]()
        return item[0]

    yield from pool.imap(run, jobs, READ_AHEAD * pool.threads)


def read_manifest(storage: Storage, name: str) -> Manifest:
    """The parsed manifest of checkpoint `name`; raises when it is missing or corrupt."""
    path = f"{name}/{MANIFEST_NAME}"
    kind = storage.kind(name)
    if kind is None:
        raise CheckpointNotFoundError(f"no checkpoint at {storage.describe(name)}")
    if kind != "dir":
        raise CorruptCheckpointError("a checkpoint must be a directory", checkpoint=name)
    if storage.kind(path) != "file":
        raise IncompleteCheckpointError(
            "no manifest: the checkpoint was never committed, or its manifest was removed",
            checkpoint=storage.describe(name),
            file=MANIFEST_NAME,
        )
    try:
        data = storage.read_bytes(path, MAX_MANIFEST_BYTES)
    except ValueError as error:
        raise CorruptCheckpointError(str(error), checkpoint=storage.describe(name)) from None
    body = decode_manifest(data, storage.describe(path))
    return parse_manifest(body, storage.describe(path))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def check_view_bounds(record: TensorRecord, entry: EntryRecord) -> None:
    """The tensor must lie inside its entry; checked before anything is allocated."""
    size = _element_size(dtype_from_name(record.dtype))
    numel = math.prod(record.shape)
    if record.stride is None:
        extent = numel * size
    elif len(record.stride) != len(record.shape):
        raise CorruptCheckpointError("stride and shape disagree", key=record.name)
    else:
        extent = (
            0
            if numel == 0
            else (1 + sum((n - 1) * s for n, s in zip(record.shape, record.stride, strict=True)))
            * size
        )
    if record.offset % size or record.offset + extent > entry.nbytes:
        raise CorruptCheckpointError("tensor lies outside its stored bytes", key=record.name)


def _check_entry(entry: EntryRecord) -> torch.dtype:
    dtype = dtype_from_name(entry.dtype)
    if math.prod(entry.shape) * _element_size(dtype) != entry.nbytes:
        raise CorruptCheckpointError(
            "entry size disagrees with its dtype and shape", key=entry.name
        )
    return dtype


class CheckpointReader:
    """Loads tensors of one checkpoint; use as a context manager."""

    def __init__(self, storage: Storage, name: str, manifest: Manifest | None = None) -> None:
        self.storage = storage
        self.name = name
        self.manifest = manifest or read_manifest(storage, name)
        self._readers: dict[str, PayloadReader] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self._readers.values())

    def payload(self, file: str) -> PayloadReader:
        if file not in self._readers:
            record = self.manifest.files[file]
            path = f"{self.name}/{file}"
            if self.storage.kind(path) != "file":
                raise IncompleteCheckpointError(
                    "payload file is missing",
                    checkpoint=self.storage.describe(self.name),
                    file=file,
                )
            if self.storage.size(path) != record.size:
                raise CorruptCheckpointError(
                    f"payload is {self.storage.size(path)} bytes, the manifest records "
                    f"{record.size}",
                    checkpoint=self.storage.describe(self.name),
                    file=file,
                )
            self._readers[file] = PayloadReader(self.storage, self.name, record)
        return self._readers[file]

    def read_entry(self, entry: EntryRecord, pool: WorkerPool | None = None) -> torch.Tensor:
        """The entry's bytes as a checked uint8 tensor of its own."""
        return self.read_entries([entry], pool)[entry.name]

    def read_entries(
        self, entries: Iterable[EntryRecord], pool: WorkerPool | None = None
    ) -> dict[str, torch.Tensor]:
        """Each entry's bytes as a checked uint8 tensor of its own.

        The reads and decodes of all entries go to the pool together (one job per
        chunk), then every entry's checksum is checked before any tensor is returned.
        """
        buffers: dict[str, torch.Tensor] = {}
        views: dict[str, memoryview] = {}
        jobs: list[tuple[int, Callable[[], None]]] = []  # (entry index, read or decode job)
        entries = list(entries)
        for index, entry in enumerate(entries):
            _check_entry(entry)
            reader = self.payload(entry.file)
            buffers[entry.name] = torch.empty(entry.nbytes, dtype=torch.uint8)
            array: Any = buffers[entry.name].numpy()
            views[entry.name] = memoryview(array).cast("B")
            start = reader.record.header_size + entry.offset
            jobs.extend((index, job) for job in reader.read_jobs(start, views[entry.name]))
        # Each entry is hashed here as soon as its last job is done, while the workers go
        # on with later entries: a pass of its own after all reads took a third of a plain
        # restore (xxhash holds the GIL, so that pass ran on one core at a time anyway).
        left = [0] * len(entries)
        for index, _ in jobs:
            left[index] += 1
        hashes: list[str | None] = [None] * len(entries)
        for index, entry in enumerate(entries):
            if not left[index]:
                hashes[index] = hash_bytes(views[entry.name])
        for index in _run_in_order(jobs, pool):
            left[index] -= 1
            if not left[index]:
                hashes[index] = hash_bytes(views[entries[index].name])
        for entry, digest in zip(entries, hashes, strict=True):
            if digest != entry.checksum:
                raise CorruptCheckpointError(
                    "tensor checksum mismatch",
                    checkpoint=self.storage.describe(self.name),
                    file=entry.file,
                    key=entry.name,
                    offset=self.payload(entry.file).record.header_size + entry.offset,
                )
        return buffers

    def load(
        self,
        keys: Iterable[str] | None = None,
        map_location: MapLocation = None,
        pool: WorkerPool | None = None,
    ) -> Any:
        manifest = self.manifest
        skeleton = manifest.state if keys is None else select(manifest.state, list(keys))
        wanted = list(dict.fromkeys(tensor_names(skeleton)))
        records = {}
        for name in wanted:
            record = manifest.tensors.get(name)
            if record is None:
                raise CorruptCheckpointError("the skeleton names an unrecorded tensor", key=name)
            check_view_bounds(record, manifest.entries[record.entry])
            records[name] = record
        entries = {r.entry: manifest.entries[r.entry] for r in records.values()}
        buffers = self.read_entries(entries.values(), pool)
        if map_location is not None:
            buffers = {name: b.to(map_location) for name, b in buffers.items()}
        tensors = {
            name: _build(record, entries[record.entry], buffers[record.entry])
            for name, record in records.items()
        }
        return unflatten(skeleton, tensors.__getitem__)


def _build(record: TensorRecord, entry: EntryRecord, buffer: torch.Tensor) -> torch.Tensor:
    dtype = dtype_from_name(record.dtype)
    shape = record.shape
    if (
        record.stride is None
        and record.offset == 0
        and math.prod(shape) * _element_size(dtype) == buffer.numel()
    ):
        return _typed(buffer, dtype).view(shape)
    size = _element_size(dtype)
    stride = record.stride
    if stride is None:
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    out = torch.empty(0, dtype=dtype, device=buffer.device)
    out.set_(buffer.untyped_storage(), record.offset // size, shape, stride)
    return out


def _typed(buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return buffer
    if buffer.numel() == 0:
        return torch.empty(0, dtype=dtype, device=buffer.device)
    return buffer.view(dtype)
