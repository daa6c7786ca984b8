"""Every file-system effect ckptstore has goes through a `Storage`.

The interface is deliberately small: the commit protocol, the manager and the
verifier use nothing else, so that

- the crash-state tests can record each operation and rebuild what a crash could
  leave behind (see `tests/test_crash_states.py`),
- fault-injecting back-ends can fail any single call (ENOSPC, EIO, EROFS),
- an object-store back-end can plug in later. There, `rename` of a directory is not
  atomic; such a back-end commits by writing the manifest last, and reports
  `atomic_rename = False` so the manager knows it.

Paths are relative, '/'-separated, and never leave the storage's root: `resolve`
refuses absolute paths and '..' components, which is what keeps a hostile manifest
from naming files outside the run directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import queue
import shutil
import stat
import sys
import threading
from typing import Any, Literal, Protocol

Kind = Literal["file", "dir", "link"]


class WriteHandle(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def fsync(self) -> None: ...
    def close(self) -> None: ...


class ReadHandle(Protocol):
    def read_into(self, offset: int, out: memoryview) -> None: ...
    def close(self) -> None: ...


class Storage(Protocol):
    """What ckptstore needs of a file system. Paths are relative to the root."""

    atomic_rename: bool

    def describe(self, path: str) -> str:
        """A human-readable location for messages."""
        ...

    def mkdir(self, path: str) -> None: ...
    def create(self, path: str) -> WriteHandle:
        """Create a new file (it must not exist) for writing."""
        ...

    def open_read(self, path: str) -> ReadHandle: ...
    def read_bytes(self, path: str, limit: int) -> bytes:
        """The whole file; refuses one larger than `limit` bytes."""
        ...

    def size(self, path: str) -> int: ...
    def kind(self, path: str) -> Kind | None:
        """What is at `path` without following links; None when nothing is."""
        ...

    def listdir(self, path: str) -> list[str]: ...
    def fsync_dir(self, path: str) -> None: ...
    def rename(self, src: str, dst: str) -> None:
        """Atomically give `src` the name `dst`, replacing a file or link there."""
        ...

    def remove_file(self, path: str) -> None: ...
    def remove_tree(self, path: str) -> None: ...
    def symlink(self, target: str, path: str) -> None: ...
    def readlink(self, path: str) -> str: ...
    def free_bytes(self, path: str) -> int: ...


def check_relative(path: str) -> str:
    """Refuse paths that could leave the root: absolute, '..', empty parts, NUL."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise ValueError(f"refusing path {path!r}: not a plain relative path")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"refusing path {path!r}: '.', '..' or empty components")
    return path


class _Writeback:
    """Asks the kernel to start writing out ranges of one file, from a thread of its own.

    Without it, a payload smaller than the kernel's dirty-page threshold sits in the page
    cache until the commit's fsync, which then writes all of it while nothing else runs:
    the device idles while the codec works and the codec idles while the device works.
    Started every `WRITEBACK_EVERY` bytes, the writeback overlaps the encoding, and the
    fsync waits for the tail only (commit phases, benchmarks/profiles/commit_phases.txt:
    the final fsync of a 656 MB payload 290 -> 4 ms, the commit 2.26 -> 1.88 s). It only
    *starts* writeback: durability still comes from the fsync, as the protocol says.

    Its own thread, because `sync_file_range` blocks while the device queue is full, and
    the writer thread must go on writing meanwhile. CPython has no `os.sync_file_range`,
    so it is called from libc through ctypes (which releases the GIL for the call); where
    that is missing (not Linux, not glibc) this does nothing. An error other than "not
    supported here" is raised at the fsync: the save fails, as it would on an fsync error.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._ranges: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="ckptstore-writeback", daemon=True)
        self._thread.start()

    def start(self, offset: int, length: int) -> None:
        self._ranges.put((offset, length))

    def _run(self) -> None:
        assert _sync_file_range is not None
        while (item := self._ranges.get()) is not None:
            if self._error is not None:
                continue
            if _sync_file_range(self._fd, item[0], item[1], _SYNC_FILE_RANGE_WRITE) != 0:
                code = ctypes.get_errno()
                if code in _WRITEBACK_UNSUPPORTED:
                    continue  # the fsync does all the work, as without this class
                self._error = OSError(code, f"sync_file_range: {os.strerror(code)}")

    def finish(self) -> None:
        """Wait until the thread is done with the fd; raise what writeback reported."""
        self._ranges.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _libc_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


# 8 MiB, not 32: a 30 MB payload (bf16 MiniLM) otherwise got no writeback before its
# fsync. Interleaved A/B of whole commits, medians (benchmarks/profiles/writeback_ab.txt):
# bf16 MiniLM 76 -> 71 ms, state c 216 -> 201 ms, state a 501 -> 472 ms. (4 MiB was
# faster again on MiniLM; it doubles the calls and was not tried on the large states.)
WRITEBACK_EVERY = 8 << 20
_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of dirty pages, do not wait
_WRITEBACK_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.EOPNOTSUPP}


class _LocalWriteHandle:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._written = 0
        self._started = 0  # bytes whose writeback has been asked for
        self._writeback: _Writeback | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self._written += written
        if _sync_file_range is not None and self._written - self._started >= WRITEBACK_EVERY:
            if self._writeback is None:
                self._writeback = _Writeback(self._fd)
            self._writeback.start(self._started, self._written - self._started)
            self._started = self._written

    def fsync(self) -> None:
        if self._writeback is not None:
            writeback, self._writeback = self._writeback, None
            writeback.finish()
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            if self._writeback is not None:
                # Its thread must be done with the fd first. Its error is not raised here:
                # a close without fsync is a save that already failed (the protocol
                # fsyncs every file it keeps), and that first error is the one to report.
                writeback, self._writeback = self._writeback, None
                with contextlib.suppress(OSError):
                    writeback.finish()
            fd, self._fd = self._fd, -1
            os.close(fd)


class _LocalReadHandle:
    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self._name = name

    def read_into(self, offset: int, out: memoryview) -> None:
        view = out.cast("B")
        while view:
            got = os.preadv(self._fd, [view], offset)
            if got == 0:
                raise EOFError(f"{self._name}: file ends before offset {offset}")
            view = view[got:]
            offset += got

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class LocalStorage:
    """POSIX back-end: real fsyncs of files and directories, `rename(2)` commits."""

    atomic_rename = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def resolve(self, path: str) -> str:
        if path == ".":
            return self.root
        return os.path.join(self.root, check_relative(path))

    def describe(self, path: str) -> str:
        return self.resolve(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(self.resolve(path))

    def create(self, path: str) -> WriteHandle:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        return _LocalWriteHandle(os.open(self.resolve(path), flags, 0o644))

    def open_read(self, path: str) -> ReadHandle:
        # O_NOFOLLOW: a payload replaced by a link (pointing anywhere) is refused.
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        return _LocalReadHandle(os.open(self.resolve(path), flags), self.resolve(path))

    def read_bytes(self, path: str, limit: int) -> bytes:
        handle = self.open_read(path)
        try:
            size = self.size(path)
            if size > limit:
                raise ValueError(f"{self.resolve(path)}: {size} bytes, more than {limit} allowed")
            out = bytearray(size)
            handle.read_into(0, memoryview(out))
            return bytes(out)
        finally:
            handle.close()

    def size(self, path: str) -> int:
        return os.lstat(self.resolve(path)).st_size

    def kind(self, path: str) -> Kind | None:
        try:
            mode = os.lstat(self.resolve(path)).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(mode):
            return "link"
        if stat.S_ISDIR(mode):
            return "dir"
        return "file"

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self.resolve(path)))

    def fsync_dir(self, path: str) -> None:
        fd = os.open(self.resolve(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        except OSError as error:
            # Some file systems cannot fsync a directory; their rename is ordered anyway.
            if error.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.replace(self.resolve(src), self.resolve(dst))

    def remove_file(self, path: str) -> None:
        os.unlink(self.resolve(path))

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(self.resolve(path))

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self.resolve(path))

    def readlink(self, path: str) -> str:
        return os.readlink(self.resolve(path))

    def free_bytes(self, path: str) -> int:
        info = os.statvfs(self.resolve(path))
        return info.f_bavail * info.f_frsize


class ForwardingStorage:
    """A `Storage` that passes every call to `inner`.

    The base of storages that watch or disturb another one (recording operations for
    the crash-state tests, injecting faults): they override only what they watch.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.atomic_rename = inner.atomic_rename

    def describe(self, path: str) -> str:
        return self.inner.describe(path)

    def mkdir(self, path: str) -> None:
        self.inner.mkdir(path)

    def create(self, path: str) -> WriteHandle:
        return self.inner.create(path)

    def open_read(self, path: str) -> ReadHandle:
        return self.inner.open_read(path)

    def read_bytes(self, path: str, limit: int) -> bytes:
        return self.inner.read_bytes(path, limit)

    def size(self, path: str) -> int:
        return self.inner.size(path)

    def kind(self, path: str) -> Kind | None:
        return self.inner.kind(path)

    def listdir(self, path: str) -> list[str]:
        return self.inner.listdir(path)

    def fsync_dir(self, path: str) -> None:
        self.inner.fsync_dir(path)

    def rename(self, src: str, dst: str) -> None:
        self.inner.rename(src, dst)

    def remove_file(self, path: str) -> None:
        self.inner.remove_file(path)

    def remove_tree(self, path: str) -> None:
        self.inner.remove_tree(path)

    def symlink(self, target: str, path: str) -> None:
        self.inner.symlink(target, path)

    def readlink(self, path: str) -> str:
        return self.inner.readlink(path)

    def free_bytes(self, path: str) -> int:
        return self.inner.free_bytes(path)
