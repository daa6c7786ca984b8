"""Storage back-ends for tests: a spy that records every call, with injectable faults.

`FaultyStorage` wraps a real `LocalStorage` (so what it leaves on disk is real) and:

- records each file-system effect as a tuple in `calls`, e.g. ("fsync", "x/a") or
  ("rename", ".tmp-x", "x"), in the order they happen;
- fails on demand: `enospc_after` bytes written in total (the write that crosses the
  limit writes its first part, then raises ENOSPC, as a full disk does), or `fail`,
  a function of each call that returns an exception to raise instead of doing it;
- slows down on demand: `gate`, an Event every payload/manifest fsync waits for, and
  `delay`, seconds each fsync sleeps.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ckptstore._storage import ForwardingStorage, LocalStorage, WriteHandle

Call = tuple[Any, ...]


def os_error(code: int, path: str = "") -> OSError:
    return OSError(code, os.strerror(code), path)


class _SpyWriteHandle:
    def __init__(self, storage: FaultyStorage, path: str, inner: WriteHandle) -> None:
        self._storage = storage
        self._path = path
        self._inner = inner

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._storage._event("write", self._path, len(view))
        limit = self._storage.enospc_after
        if limit is not None and self._storage.written + len(view) > limit:
            room = max(0, limit - self._storage.written)
            self._inner.write(view[:room])
            self._storage.written += room
            raise os_error(errno.ENOSPC, self._path)
        self._inner.write(view)
        self._storage.written += len(view)

    def fsync(self) -> None:
        self._storage._event("fsync", self._path)
        if self._storage.gate is not None:
            self._storage.gate.wait()
        if self._storage.delay:
            time.sleep(self._storage.delay)
        self._inner.fsync()

    def close(self) -> None:
        self._storage.calls.append(("close", self._path))
        self._inner.close()


class FaultyStorage(ForwardingStorage):
    """A LocalStorage whose calls are recorded and can be made to fail or stall."""

    atomic_rename = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        enospc_after: int | None = None,
        fail: Callable[[Call], BaseException | None] | None = None,
        gate: threading.Event | None = None,
        delay: float = 0.0,
        skip_dir_fsync: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__(LocalStorage(root))
        self.root = self.inner.root
        self.calls: list[Call] = []
        self.enospc_after = enospc_after
        self.written = 0
        self.fail = fail
        self.gate = gate
        self.delay = delay
        self.skip_dir_fsync = skip_dir_fsync  # a mutant: directory fsyncs that never happen
        self._lock = threading.Lock()

    def _event(self, *call: Any) -> None:
        with self._lock:
            self.calls.append(call)
        if self.fail is not None:
            error = self.fail(call)
            if error is not None:
                raise error

    def ops(self, *names: str) -> list[Call]:
        """The recorded calls of the given operations, in order."""
        return [c for c in self.calls if c[0] in names]

    # -- the Storage protocol ------------------------------------------------------------

    def mkdir(self, path: str) -> None:
        self._event("mkdir", path)
        self.inner.mkdir(path)

    def create(self, path: str) -> WriteHandle:
        self._event("create", path)
        return _SpyWriteHandle(self, path, self.inner.create(path))

    def fsync_dir(self, path: str) -> None:
        if self.skip_dir_fsync is not None and self.skip_dir_fsync(path):
            return
        self._event("fsync_dir", path)
        self.inner.fsync_dir(path)

    def rename(self, src: str, dst: str) -> None:
        self._event("rename", src, dst)
        self.inner.rename(src, dst)

    def remove_file(self, path: str) -> None:
        self._event("remove_file", path)
        self.inner.remove_file(path)

    def remove_tree(self, path: str) -> None:
        self._event("remove_tree", path)
        self.inner.remove_tree(path)

    def symlink(self, target: str, path: str) -> None:
        self._event("symlink", target, path)
        self.inner.symlink(target, path)


def tree_bytes(root: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes), to compare a tree before/after."""
    out: dict[str, bytes] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def route_saves_through(monkeypatch: Any, storage: FaultyStorage) -> None:
    """Make `ckptstore.save/load/Checkpointer` use `storage` for paths under its root."""
    import ckptstore._api as api

    def split(path: str | os.PathLike[str]) -> tuple[Any, str]:
        full = os.path.abspath(os.fspath(path))
        assert os.path.dirname(full) == storage.root, "save under the storage's root"
        return storage, os.path.basename(full)

    monkeypatch.setattr(api, "_split", split)
