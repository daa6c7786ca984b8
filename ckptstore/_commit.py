"""The commit protocol: how a snapshot becomes a checkpoint that survives a crash.

The order of effects, and what a reader finds after a crash (or power cut) at each
point:

1. `mkdir .tmp-<name>-<random>`. A crash from here to step 5 leaves only this hidden
   directory. Readers never look inside `.tmp-*`; the next writer removes it under the
   lock.
2. Write the payload, then `fsync` it. Until the fsync returns its bytes may not be
   on disk; nobody relies on them yet.
3. Write `manifest.json` (sizes and checksums of everything else), then `fsync` it.
   The manifest comes last so that a directory holding a manifest holds every byte
   the manifest describes.
4. `fsync` the temporary directory, so the *names* of both files are durable too (a
   file's fsync does not make its directory entry durable).
5. `rename(.tmp-…, <name>)`. This is the commit: atomic, so a reader sees either no
   checkpoint called <name> or a complete one. A name that already exists is never
   replaced; the caller retires it first (rollback) or gets an error.
6. `fsync` the parent directory, making the rename itself durable. Only after this
   may pointers move or retention delete older checkpoints: before it, a power cut
   could undo the rename while a deletion of the previous checkpoint survived.

If any step fails, the temporary directory is removed (best effort) and the error is
raised; nothing under a final name changes. An `fsync` that fails with EIO is never
retried: Linux may have dropped the dirty pages and cleared the error, so a second
fsync could report success for data that is gone. The whole save fails instead, and
the next save writes everything again from the snapshot.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ._format import CodecConfig, write_payload
from ._layout import dtype_name, stored_form
from ._manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    FileRecord,
    encode_manifest,
    encode_number,
    library_versions,
)
from ._snapshot import Snapshot
from ._storage import Storage
from ._workers import WorkerPool

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


@dataclass(frozen=True)
class CommitResult:
    """What a committed save produced."""

    name: str  # the checkpoint's directory name, relative to the storage root
    location: str  # for people: the full path or URL
    step: int | None
    raw_bytes: int
    stored_bytes: int
    seconds: float  # from the start of the write to the durable commit


@dataclass(frozen=True)
class SaveRequest:
    """Everything the writer needs, captured by `save()` before it returns."""

    storage: Storage
    name: str
    snapshot: Snapshot
    skeleton: Any
    step: int | None
    metrics: dict[str, float]
    metadata: Any  # a skeleton: user metadata encoded like the state
    codec: CodecConfig
    before_rename: Callable[[str], None] | None = None  # test hook


def temp_name(name: str) -> str:
    return f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}"


def _manifest_body(request: SaveRequest, record: FileRecord, sums: dict[str, str]) -> dict:
    plan = request.snapshot.plan
    entries = {}
    for entry in plan.entries:
        tag, st_shape = stored_form(entry.dtype, entry.shape, entry.nbytes)
        entries[entry.name] = {
            "file": record.name,
            "dtype": dtype_name(entry.dtype),
            "shape": list(entry.shape),
            "st_dtype": tag,
            "st_shape": st_shape,
            "offset": entry.offset,
            "nbytes": entry.nbytes,
            "checksum": sums[entry.name],
        }
    tensors = {
        view.name: {
            "entry": view.entry,
            "dtype": dtype_name(view.dtype),
            "shape": list(view.shape),
            "offset": view.offset,
            "stride": None if view.stride is None else list(view.stride),
        }
        for view in plan.views
    }
    file_json = {
        "size": record.size,
        "raw_size": record.raw_size,
        "header_size": record.header_size,
        "checksum": record.checksum,
        "chunks": [
            [c.raw_offset, c.raw_len, c.stored_offset, c.stored_len, c.transform, c.checksum]
            for c in record.chunks
        ],
    }
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "step": request.step,
        "metrics": {k: encode_number(v) for k, v in request.metrics.items()},
        "metadata": request.metadata,
        "versions": library_versions(),
        "codec": request.codec.as_json(),
        "files": {record.name: file_json},
        "entries": entries,
        "tensors": tensors,
        "state": request.skeleton,
    }


def write_durable(storage: Storage, path: str, data: bytes) -> None:
    """Create `path` with `data` and fsync it (its directory entry is not fsynced)."""
    handle = storage.create(path)
    try:
        handle.write(data)
        handle.fsync()
    finally:
        handle.close()


def discard(storage: Storage, path: str) -> None:
    """Remove a temporary directory after a failure, never raising over the real error."""
    try:
        if storage.kind(path) is not None:
            storage.remove_tree(path)
    except OSError as error:
        log.debug("could not remove %s after a failed save: %s", storage.describe(path), error)


def commit(request: SaveRequest, pool: WorkerPool) -> CommitResult:
    """Write the snapshot as checkpoint `request.name`, following the protocol above."""
    storage, name = request.storage, request.name
    started = time.perf_counter()
    tmp = temp_name(name)
    storage.mkdir(tmp)
    try:
        request.snapshot.wait_ready()
        handle = storage.create(f"{tmp}/{request.codec.file_name}")
        try:
            record, sums = write_payload(handle, request.snapshot, request.codec, pool)
            handle.fsync()
        finally:
            handle.close()
        body = _manifest_body(request, record, sums)
        write_durable(storage, f"{tmp}/{MANIFEST_NAME}", encode_manifest(body))
        storage.fsync_dir(tmp)
        if request.before_rename is not None:
            request.before_rename(storage.describe(tmp))
        if storage.kind(name) is not None:
            raise FileExistsError(
                f"{storage.describe(name)} already exists; a committed checkpoint is never "
                "replaced (retire it first, or save under another name)"
            )
        storage.rename(tmp, name)
    except BaseException as error:
        discard(storage, tmp)
        if isinstance(error, OSError) and error.filename is None:
            # os.write and os.fsync name no file; the caller should see which save failed.
            error.filename = storage.describe(name)
        raise
    storage.fsync_dir(".")
    return CommitResult(
        name,
        storage.describe(name),
        request.step,
        record.raw_size,
        record.size,
        time.perf_counter() - started,
    )
