"""The payload file: a safetensors byte stream, stored plain or as independent chunks.

Writing: the plain stream is the header (from `_layout.plan`) followed by the data
section (the snapshot's staging buffer). It is cut into chunks of at most
`chunk_size` bytes that never straddle two entries and hold whole elements, so each
chunk can be byte-grouped by its dtype and compressed on its own, on any core, and
read back alone. With `codec="none"` every chunk is stored as-is: the file *is* a
plain `.safetensors` file. The chunk table (offsets, lengths, transform, checksum of
the stored bytes) goes into the manifest.

Reading: `PayloadReader.read_into` returns any byte range of the plain stream,
touching only the chunks that overlap it, so one tensor reads only its own bytes.
"""

from __future__ import annotations

import bisect
import json
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from . import _codec
from ._layout import COMPLEX_AS_REAL, Plan
from ._manifest import Chunk, FileRecord, Manifest, hash_bytes, hash_parts
from ._snapshot import Snapshot
from ._storage import Storage, WriteHandle
from ._workers import ThreadScratch, WorkerPool
from .errors import CorruptCheckpointError

DEFAULT_CHUNK_SIZE = 4 << 20
# Chunks queued on the pool per worker thread. The writer thread writes each encoded
# chunk before it takes the next result; with only two per thread in flight the workers
# ran dry during those writes (py-spy: idle a third of a save). Four keeps them busy;
# the encoded chunks held meanwhile are bounded by threads * 4 * chunk size.
AHEAD_PER_THREAD = 4
# A plain payload is read in pieces of this size, so that large tensors load on all cores.
PLAIN_READ_PIECE = 16 << 20
PLAIN_FILE = "payload.safetensors"
COMPRESSED_FILE = "payload.safetensors.zst"


@dataclass(frozen=True)
class CodecConfig:
    name: str = "none"  # "none" or "zstd"
    level: int = 3
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        if self.name not in ("none", "zstd"):
            raise ValueError(f"codec must be 'none' or 'zstd', not {self.name!r}")
        if not 1 <= self.level <= 22:
            raise ValueError(f"zstd level must be between 1 and 22, not {self.level}")
        if not 4096 <= self.chunk_size <= 64 << 20:
            raise ValueError(f"chunk_size must be between 4 KiB and 64 MiB, not {self.chunk_size}")

    @property
    def file_name(self) -> str:
        return PLAIN_FILE if self.name == "none" else COMPRESSED_FILE

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level, "chunk_size": self.chunk_size}


@dataclass(frozen=True)
class _Piece:
    raw_offset: int
    data: memoryview
    dtype: torch.dtype | None  # None: opaque bytes (the header)
    # On an entry's first piece: the entry's name and all its bytes, which the job that
    # encodes this piece also checksums (see write_payload).
    entry: tuple[str, memoryview] | None = None


def _pieces(plan: Plan, snapshot: Snapshot, chunk_size: int) -> Iterator[_Piece]:
    header = memoryview(plan.header)
    for start in range(0, len(header), chunk_size):
        yield _Piece(start, header[start : start + chunk_size], None)
    base = len(plan.header)
    for entry in plan.entries:
        dtype = COMPLEX_AS_REAL.get(entry.dtype, entry.dtype)
        item = torch.empty(0, dtype=dtype).element_size()
        step = max(item, chunk_size - chunk_size % item)
        view = snapshot.entry_view(entry)
        for start in range(0, entry.nbytes, step):
            whole = (entry.name, view) if start == 0 else None
            yield _Piece(base + entry.offset + start, view[start : start + step], dtype, whole)


_Encoded = tuple[_Piece, list[Any], str, str, tuple[str, str] | None]


def _encode(piece: _Piece, codec: CodecConfig) -> _Encoded:
    """The stored form of one piece as consecutive parts, its tag, its checksum, and the
    raw checksum of its entry where it is the entry's first piece."""
    entry_sum = None if piece.entry is None else (piece.entry[0], hash_bytes(piece.entry[1]))
    if codec.name == "none":
        return piece, [piece.data], "raw", hash_bytes(piece.data), entry_sum
    parts, transform = _codec.encode_chunk_parts(piece.data, piece.dtype, codec.level)
    return piece, parts, transform, hash_parts(parts), entry_sum


def write_payload(
    handle: WriteHandle, snapshot: Snapshot, codec: CodecConfig, pool: WorkerPool
) -> tuple[FileRecord, dict[str, str]]:
    """Write the payload through `handle` (not fsynced here); return its record and the
    raw checksum of every entry.

    The entry checksums are taken by the encoding jobs (each entry's by the job of its
    first chunk), not in a pass of their own before the writing: that pass was a serial
    phase of every commit (9 of 72 ms for bf16 MiniLM, commit_phases.txt), with a pool
    hand-off per entry, while the disk and the other workers waited.
    """
    plan = snapshot.plan
    chunks: list[Chunk] = []
    sums = {e.name: hash_bytes(b"") for e in plan.entries if e.nbytes == 0}  # no pieces
    stored_at = 0
    pieces = _pieces(plan, snapshot, codec.chunk_size)
    if codec.name == "none":
        results: Iterator[_Encoded] = (_encode(p, codec) for p in pieces)
    else:
        window = AHEAD_PER_THREAD * pool.threads
        results = pool.imap(lambda p: _encode(p, codec), pieces, window)
    for piece, parts, transform, checksum, entry_sum in results:
        if entry_sum is not None:
            sums[entry_sum[0]] = entry_sum[1]
        size = 0
        for part in parts:
            handle.write(part)
            size += memoryview(part).nbytes
        chunks.append(
            Chunk(piece.raw_offset, len(piece.data), stored_at, size, transform, checksum)
        )
        stored_at += size
    record = FileRecord(
        codec.file_name,
        stored_at,
        plan.raw_size,
        len(plan.header),
        hash_bytes("".join(c.checksum for c in chunks).encode()),
        tuple(chunks),
    )
    return record, {e.name: sums[e.name] for e in plan.entries}


# Stored chunks that are decoded at once are read into this, not into a fresh bytearray
# per chunk (which was zeroed and page-faulted in before the read overwrote it).
_scratch = ThreadScratch()


class PayloadReader:
    """Reads byte ranges of one payload file's plain stream, verifying what it reads."""

    def __init__(self, storage: Storage, directory: str, record: FileRecord) -> None:
        self.storage = storage
        self.path = f"{directory}/{record.name}"
        # Errors name the checkpoint as the user knows it and the file inside it, as
        # the manifest does: `path` is relative to the storage root, which is neither.
        self.checkpoint = storage.describe(directory)
        self.record = record
        self._starts = [c.raw_offset for c in record.chunks]
        self._plain = all(c.transform == "raw" for c in record.chunks)
        self._handle = storage.open_read(self.path)
        self._lock = threading.Lock()
        self.bytes_read = 0

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> PayloadReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_stored(self, offset: int, out: memoryview) -> None:
        try:
            self._handle.read_into(offset, out)
        except EOFError:
            raise CorruptCheckpointError(
                "payload is shorter than its manifest records",
                checkpoint=self.checkpoint,
                file=self.record.name,
                offset=offset,
            ) from None
        with self._lock:
            self.bytes_read += len(out)

    def chunk_bytes(self, chunk: Chunk, verify: bool) -> bytearray:
        stored = bytearray(chunk.stored_len)
        self._check_stored(chunk, memoryview(stored), verify)
        return stored

    def _check_stored(self, chunk: Chunk, stored: memoryview, verify: bool) -> None:
        self._read_stored(chunk.stored_offset, stored)
        if verify and hash_bytes(stored) != chunk.checksum:
            raise CorruptCheckpointError(
                "chunk checksum mismatch",
                checkpoint=self.checkpoint,
                file=self.record.name,
                offset=chunk.stored_offset,
            )

    def decode(self, chunk: Chunk, out: memoryview) -> None:
        """Fill `out` (exactly chunk.raw_len bytes) with the chunk's plain bytes."""
        if chunk.transform == "raw":  # the stored bytes are the plain bytes: read in place
            if len(out) != chunk.stored_len:
                raise CorruptCheckpointError(
                    f"raw chunk holds {chunk.stored_len} bytes, its range {len(out)}",
                    checkpoint=self.checkpoint,
                    file=self.record.name,
                    offset=chunk.stored_offset,
                )
            self._check_stored(chunk, out, verify=True)
            return
        stored = _scratch.view(chunk.stored_len)
        self._check_stored(chunk, stored, verify=True)
        try:
            _codec.decode_chunk_into(stored, chunk.transform, out)
        except ValueError as error:
            raise CorruptCheckpointError(
                f"chunk does not decode: {error}",
                checkpoint=self.checkpoint,
                file=self.record.name,
                offset=chunk.stored_offset,
            ) from None

    def read_jobs(self, raw_offset: int, out: memoryview) -> list[Callable[[], None]]:
        """Independent jobs that together fill `out` with the plain stream's bytes from
        `raw_offset` on: one per stored chunk, or per 16 MiB of a plain file, so that a
        pool can run the reads and decodes of many tensors at once."""
        if not out.nbytes:
            return []
        if self._plain:  # stored bytes are the plain bytes; the caller checks them
            step = PLAIN_READ_PIECE
            return [
                partial(self._read_stored, raw_offset + at, out[at : at + step])
                for at in range(0, out.nbytes, step)
            ]
        end = raw_offset + out.nbytes
        first = bisect.bisect_right(self._starts, raw_offset) - 1
        wanted: list[Chunk] = []
        for chunk in self.record.chunks[max(first, 0) :]:
            if chunk.raw_offset >= end:
                break
            wanted.append(chunk)
        return [partial(self._decode_part, chunk, raw_offset, out) for chunk in wanted]

    def _decode_part(self, chunk: Chunk, raw_offset: int, out: memoryview) -> None:
        lo = max(chunk.raw_offset, raw_offset)
        hi = min(chunk.raw_offset + chunk.raw_len, raw_offset + out.nbytes)
        target = out[lo - raw_offset : hi - raw_offset]
        if lo == chunk.raw_offset and hi == chunk.raw_offset + chunk.raw_len:
            self.decode(chunk, target)
        else:
            whole = bytearray(chunk.raw_len)
            self.decode(chunk, memoryview(whole))
            target[:] = memoryview(whole)[lo - chunk.raw_offset : hi - chunk.raw_offset]

    def read_into(self, raw_offset: int, out: memoryview) -> None:
        """Fill `out` with the plain stream's bytes from `raw_offset` on, on this thread
        (whole restores run the same jobs on a pool: CheckpointReader.read_entries)."""
        for job in self.read_jobs(raw_offset, out):
            job()


def read_header(reader: PayloadReader) -> dict[str, Any]:
    """The safetensors header of the payload, parsed (for verification and tools)."""
    size = reader.record.header_size
    raw = bytearray(size)
    reader.read_into(0, memoryview(raw))
    (length,) = struct.unpack("<Q", raw[:8])
    if length + 8 != size:
        raise CorruptCheckpointError(
            "safetensors header length disagrees with the manifest",
            checkpoint=reader.checkpoint,
            file=reader.record.name,
            offset=0,
        )
    try:
        header = json.loads(raw[8:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CorruptCheckpointError(
            "safetensors header is not valid JSON",
            checkpoint=reader.checkpoint,
            file=reader.record.name,
            offset=8,
        ) from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(
            "safetensors header is not an object",
            checkpoint=reader.checkpoint,
            file=reader.record.name,
        )
    return header


def check_header(header: dict[str, Any], manifest: Manifest, file: FileRecord, where: str) -> None:
    """The header must describe exactly the entries the manifest records for this file."""
    mine = {n: e for n, e in manifest.entries.items() if e.file == file.name}
    names = set(header) - {"__metadata__"}
    if names != set(mine):
        raise CorruptCheckpointError(
            "safetensors header lists other tensors than the manifest", file=where
        )
    for name, entry in mine.items():
        info = header[name]
        expected = {
            "dtype": entry.st_dtype,
            "shape": list(entry.st_shape),
            "data_offsets": [entry.offset, entry.offset + entry.nbytes],
        }
        if info != expected:
            raise CorruptCheckpointError(
                "safetensors header disagrees with the manifest", file=where, key=name
            )
