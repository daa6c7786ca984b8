"""Crash simulation for tests: record a storage's effects, then rebuild what a crash leaves.

`RecordingStorage` wraps any `Storage` and records every effect on the file system
(mkdir, create, write, fsync of a file, fsync of a directory, rename, remove, symlink)
as an `Op`, with the bytes written. `crash_states` then lists the states a crash could
leave after any prefix of those ops, and `replay` builds one of them in a directory.

The model (what a POSIX file system promises, and no more):

- a file's data is durable once that file was fsynced after the write;
- a directory entry (mkdir, create, rename, unlink, symlink) is durable once its
  directory was fsynced after it (a rename needs both parents);
- anything not yet durable at the crash may independently be lost. A lost write
  leaves zeros of the same length (the size survived, the data did not, the case a
  size check misses); a lost entry op simply did not happen, and ops that needed it
  (a write into a file whose creation was lost) fail and are skipped.

Consecutive writes to one file are recorded as one op, and `remove_tree` is one op
(it only ever removes hidden trash or temporary directories, which no reader opens).
Directories are tracked by identity, so fsyncing `step-…` after `.tmp-…` was renamed to
it counts for the entries made while it was still called `.tmp-…`.

Users can run their own save/retention code through `RecordingStorage` and check each
crash state the same way `tests/test_crash_states.py` does.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

from ._storage import ForwardingStorage, Storage, WriteHandle

OpKind = Literal[
    "mkdir",
    "create",
    "write",
    "fsync",
    "fsync_dir",
    "rename",
    "remove_file",
    "remove_tree",
    "symlink",
    "mark",
]
_ENTRY_OPS = ("mkdir", "create", "rename", "remove_file", "remove_tree", "symlink")


@dataclass(frozen=True)
class Op:
    """One recorded effect. `other` is a rename's destination or a symlink's target."""

    index: int
    kind: OpKind
    path: str
    other: str | None = None
    data: bytes = b""
    file: int | None = None  # which create() a write or fsync belongs to

    def __str__(self) -> str:
        extra = f" -> {self.other}" if self.other is not None else ""
        size = f" ({len(self.data)} bytes)" if self.kind == "write" else ""
        return f"#{self.index} {self.kind} {self.path}{extra}{size}"


class _RecordingWriteHandle:
    def __init__(self, owner: RecordingStorage, inner: WriteHandle, path: str, file: int):
        self._owner, self._inner, self._path, self._file = owner, inner, path, file

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.write(data)
        self._owner._record_write(self._path, self._file, bytes(memoryview(data).cast("B")))

    def fsync(self) -> None:
        self._inner.fsync()
        self._owner._record("fsync", self._path, file=self._file)

    def close(self) -> None:
        self._inner.close()


class RecordingStorage(ForwardingStorage):
    """A `Storage` that passes every call through and records each effect as an `Op`."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.ops: list[Op] = []
        self._files = itertools.count()
        self._lock = threading.Lock()

    def _record(self, kind: OpKind, path: str, **fields: object) -> None:
        with self._lock:
            self.ops.append(Op(len(self.ops), kind, path, **fields))  # type: ignore[arg-type]

    def _record_write(self, path: str, file: int, data: bytes) -> None:
        with self._lock:
            last = self.ops[-1] if self.ops else None
            if last is not None and last.kind == "write" and last.file == file:
                self.ops[-1] = replace(last, data=last.data + data)
            else:
                self.ops.append(Op(len(self.ops), "write", path, data=data, file=file))

    def mark(self, label: str) -> None:
        """Record a label (e.g. "committed step-…") between two effects."""
        self._record("mark", label)

    # -- effects, recorded after they happened -------------------------------------
    def mkdir(self, path: str) -> None:
        self.inner.mkdir(path)
        self._record("mkdir", path)

    def create(self, path: str) -> WriteHandle:
        handle = self.inner.create(path)
        file = next(self._files)
        self._record("create", path, file=file)
        return _RecordingWriteHandle(self, handle, path, file)

    def fsync_dir(self, path: str) -> None:
        self.inner.fsync_dir(path)
        self._record("fsync_dir", path)

    def rename(self, src: str, dst: str) -> None:
        self.inner.rename(src, dst)
        self._record("rename", src, other=dst)

    def remove_file(self, path: str) -> None:
        self.inner.remove_file(path)
        self._record("remove_file", path)

    def remove_tree(self, path: str) -> None:
        self.inner.remove_tree(path)
        self._record("remove_tree", path)

    def symlink(self, target: str, path: str) -> None:
        self.inner.symlink(target, path)
        self._record("symlink", path, other=target)


# --- the durability model ----------------------------------------------------------------


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


def durable_at(ops: list[Op]) -> list[int]:
    """For each op, the index of the op after which it is durable (len(ops): never).

    Barriers (fsyncs) and marks are durable at once; they are never lost.
    """
    never = len(ops)
    result = [never] * len(ops)
    dirs: dict[str, int] = {".": 0}  # path -> directory identity
    next_dir = itertools.count(1)
    pending_entries: list[tuple[int, set[int]]] = []  # op index, parent dirs it waits for
    pending_writes: list[tuple[int, int]] = []  # op index, file

    def dir_of(path: str) -> int:
        return dirs.setdefault(path, next(next_dir))  # an unknown dir gets its own identity

    for op in ops:
        if op.kind in ("fsync", "fsync_dir", "mark"):
            result[op.index] = op.index
        if op.kind == "write":
            pending_writes.append((op.index, op.file or 0))
        elif op.kind == "fsync":
            for index, file in pending_writes:
                if file == op.file and result[index] == never:
                    result[index] = op.index
        elif op.kind == "fsync_dir":
            synced = dir_of(op.path)
            for index, waits in pending_entries:
                waits.discard(synced)
                if not waits and result[index] == never:
                    result[index] = op.index
        elif op.kind in _ENTRY_OPS:
            parents = {dir_of(_parent(op.path))}
            if op.kind == "rename":
                assert op.other is not None
                parents.add(dir_of(_parent(op.other)))
            pending_entries.append((op.index, parents))
            _track_dirs(dirs, op, next_dir)
    return result


def _track_dirs(dirs: dict[str, int], op: Op, next_dir: Iterator[int]) -> None:
    """Keep the path -> directory-identity map up to date."""
    if op.kind == "mkdir":
        dirs[op.path] = next(next_dir)
    elif op.kind == "rename" and op.other is not None:
        moved = {p: i for p, i in dirs.items() if p == op.path or p.startswith(op.path + "/")}
        for path, identity in moved.items():
            del dirs[path]
            dirs[op.other + path[len(op.path) :]] = identity
    elif op.kind == "remove_tree":
        for path in [p for p in dirs if p == op.path or p.startswith(op.path + "/")]:
            del dirs[path]


@dataclass(frozen=True)
class CrashState:
    prefix: int  # ops[:prefix] were issued before the crash
    lost: frozenset[int]  # indices of issued, non-durable ops that did not survive

    def describe(self, ops: list[Op]) -> str:
        lost = ", ".join(str(ops[i]) for i in sorted(self.lost)) or "nothing"
        last = str(ops[self.prefix - 1]) if self.prefix else "(no op)"
        return f"crash after {last}; lost: {lost}"


def crash_states(ops: list[Op], k: int, samples: int = 0, seed: int = 0) -> Iterator[CrashState]:
    """Every prefix with every subset of at most `k` lost non-durable ops, then
    `samples` random larger subsets per prefix where there are more than `k`."""
    durable = durable_at(ops)
    rng = random.Random(seed)
    for prefix in range(len(ops) + 1):
        fragile = [i for i in range(prefix) if durable[i] >= prefix]
        for size in range(min(k, len(fragile)) + 1):
            for lost in itertools.combinations(fragile, size):
                yield CrashState(prefix, frozenset(lost))
        if len(fragile) > k:
            for _ in range(samples):
                size = rng.randint(k + 1, len(fragile))
                yield CrashState(prefix, frozenset(rng.sample(fragile, size)))


def replay(ops: list[Op], state: CrashState, root: str) -> None:
    """Apply the surviving ops of `state` onto the directory `root` (a copy of the
    tree the ops started from). Ops whose prerequisites were lost are skipped."""
    fds: dict[int, int] = {}
    try:
        for op in ops[: state.prefix]:
            lost = op.index in state.lost
            if lost and op.kind != "write":
                continue
            try:
                _apply(op, lost, root, fds)
            except OSError:
                continue  # it needed something that was lost
    finally:
        for fd in fds.values():
            os.close(fd)


def _apply(op: Op, lost: bool, root: str, fds: dict[int, int]) -> None:
    path = os.path.join(root, op.path)
    if op.kind == "mkdir":
        os.mkdir(path)
    elif op.kind == "create":
        assert op.file is not None
        fds[op.file] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    elif op.kind == "write":
        if op.file in fds:
            os.write(fds[op.file], bytes(len(op.data)) if lost else op.data)
    elif op.kind == "rename":
        assert op.other is not None
        os.replace(path, os.path.join(root, op.other))
    elif op.kind == "remove_file":
        os.unlink(path)
    elif op.kind == "remove_tree":
        shutil.rmtree(path)
    elif op.kind == "symlink":
        assert op.other is not None
        os.symlink(op.other, path)
