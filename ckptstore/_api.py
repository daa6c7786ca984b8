"""Single checkpoints: `save`, `load`, `verify`, and `Checkpointer` for async saves.

`CheckpointManager` (a series of checkpoints in one run directory) builds on these;
use these directly when you manage paths yourself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._commit import CommitResult, SaveRequest, commit
from ._format import DEFAULT_CHUNK_SIZE, CodecConfig
from ._layout import plan
from ._manifest import encode_number
from ._pointers import POINTERS, read_pointer
from ._read import CheckpointReader, MapLocation
from ._runverify import RunReport, looks_like_checkpoint, resolve_checkpoint, verify_run
from ._snapshot import StagingPool, take
from ._storage import LocalStorage, Storage
from ._tree import flatten
from ._verify import CheckpointReport, verify_checkpoint
from ._workers import WorkerPool
from ._writer import SaveHandle, Writer, close_after_error
from .errors import CheckpointNotFoundError, InsufficientSpaceError, UnsupportedValueError

SPACE_MARGIN = 1 << 20  # room for the manifest and file-system overhead


def _split(path: str | os.PathLike[str]) -> tuple[LocalStorage, str]:
    full = os.path.abspath(os.fspath(path))
    return LocalStorage(os.path.dirname(full)), os.path.basename(full)


def normalise_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be str, not {type(key).__name__} ({key!r})")
        if hasattr(value, "item") and not isinstance(value, (int, float)):
            value = value.item()  # a 0-dim tensor or numpy scalar
        try:
            encode_number(value)
        except TypeError as error:
            raise TypeError(f"metric {key!r}: {error}") from None
        out[key] = value
    return out


def encode_metadata(metadata: Mapping[str, Any] | None) -> Any:
    skeleton, leaves = flatten(dict(metadata or {}))
    if leaves:
        raise UnsupportedValueError(
            f"metadata{leaves[0].path}", "metadata holds plain values only; put tensors in state"
        )
    return skeleton


def prepare(
    storage: Storage,
    name: str,
    state: Any,
    *,
    step: int | None,
    metrics: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    codec: CodecConfig,
    before_rename: Callable[[str], None] | None = None,
) -> Callable[[StagingPool], SaveRequest]:
    """Check `state` and plan its payload now; return the step that takes the snapshot.

    Everything that can refuse a save (unsupported values, a full disk) runs here,
    before a byte is copied or written.
    """
    if step is not None and (type(step) is not int or step < 0):
        raise ValueError(f"step must be a non-negative int, not {step!r}")
    skeleton, leaves = flatten(state)
    metric_values = normalise_metrics(metrics)
    metadata_skeleton = encode_metadata(metadata)
    payload = plan(leaves)
    needed = payload.raw_size + SPACE_MARGIN
    free = storage.free_bytes(".")
    if free < needed:
        raise InsufficientSpaceError(storage.describe(name), needed, free)

    def snapshot(staging: StagingPool) -> SaveRequest:
        return SaveRequest(
            storage,
            name,
            take(payload, staging),
            skeleton,
            step,
            metric_values,
            metadata_skeleton,
            codec,
            before_rename,
        )

    return snapshot


def save(
    path: str | os.PathLike[str],
    state: Any,
    *,
    step: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    codec: str = "none",
    level: int = 3,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int | None = None,
) -> CommitResult:
    """Write `state` to the checkpoint directory `path` and commit it; blocks until durable."""
    storage, name = _split(path)
    config = CodecConfig(codec, level, chunk_size)
    build = prepare(
        storage, name, state, step=step, metrics=metrics, metadata=metadata, codec=config
    )
    pool = WorkerPool(threads or min(8, os.cpu_count() or 1))
    try:
        return commit(build(StagingPool(keep=0)), pool)
    finally:
        pool.close()


def load(
    path: str | os.PathLike[str],
    *,
    keys: Iterable[str] | None = None,
    map_location: MapLocation = None,
) -> Any:
    """The state saved at `path` (or only `keys`), with every byte checked.

    `path` is a checkpoint directory, or a run directory's `latest`/`best` pointer.
    """
    storage, name = _split(path)
    if name in POINTERS and storage.kind(name) in ("link", "file"):
        name = read_pointer(storage, name) or name
    if storage.kind(name) == "dir" and not looks_like_checkpoint(storage, name):
        raise CheckpointNotFoundError(
            f"{storage.describe(name)} is not a checkpoint (it has no manifest); for a run "
            "directory, use CheckpointManager(path, read_only=True).load()"
        )
    pool = WorkerPool(min(8, os.cpu_count() or 1))
    try:
        with CheckpointReader(storage, name) as reader:
            return reader.load(keys, map_location, pool)
    finally:
        pool.close()


def verify(path: str | os.PathLike[str], deep: bool = False) -> CheckpointReport | RunReport:
    """Check a checkpoint, or a whole run directory, from its files alone.

    `path` is a checkpoint directory (or a `best`/`latest` pointer to one), and the
    answer a `CheckpointReport`; or a run directory, and the answer a `RunReport`
    (every checkpoint, the pointers, leftovers). A directory holding a manifest or a
    payload file is a checkpoint. Both reports have `status`, `sound` and `as_dict()`.
    """
    storage, name = resolve_checkpoint(path)
    if storage.kind(name) == "dir" and not looks_like_checkpoint(storage, name):
        return verify_run(os.path.join(storage.root, name), deep)
    return verify_checkpoint(storage, name, deep)


class Checkpointer:
    """Asynchronous saves of single checkpoints: `save()` returns after the snapshot."""

    def __init__(
        self,
        *,
        codec: str = "none",
        level: int = 3,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        threads: int | None = None,
        max_pending: int = 1,
        exit_timeout: float = 60.0,
    ) -> None:
        self.codec = CodecConfig(codec, level, chunk_size)
        self._writer = Writer(threads, max_pending, exit_timeout)

    def save(
        self,
        path: str | os.PathLike[str],
        state: Any,
        *,
        step: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> SaveHandle:
        self._writer.raise_error()
        storage, name = _split(path)
        build = prepare(
            storage, name, state, step=step, metrics=metrics, metadata=metadata, codec=self.codec
        )
        return self._writer.submit(build)

    def wait(self, timeout: float | None = None) -> None:
        self._writer.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        self._writer.close(timeout)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.close()
            return
        close_after_error(self.close, self._writer.exit_timeout, exc)
