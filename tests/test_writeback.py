"""Early writeback: the write handle asks the kernel to start writing ranges out while the
payload is still being written; errors from it fail the save at the fsync."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from ckptstore import _storage
from ckptstore._storage import WRITEBACK_EVERY, LocalStorage

PIECE = 4 << 20


class FakeSyncFileRange:
    """Records (fd, offset, length, flags); fails with `fail_errno` when it is set."""

    def __init__(self, fail_errno: int = 0) -> None:
        self.calls: list[tuple[int, int, int, int]] = []
        self.fail_errno = fail_errno

    def __call__(self, fd: int, offset: int, length: int, flags: int) -> int:
        self.calls.append((fd, offset, length, flags))
        if self.fail_errno:
            ctypes.set_errno(self.fail_errno)
            return -1
        return 0


def write_file(tmp_path: Path, size: int) -> tuple[bytes, object]:
    data = bytes(range(256)) * (size // 256)
    handle = LocalStorage(tmp_path).create("payload")
    for at in range(0, size, PIECE):
        handle.write(data[at : at + PIECE])
    return data, handle


def test_writeback_covers_every_full_range_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeSyncFileRange()
    monkeypatch.setattr(_storage, "_sync_file_range", fake)
    every = 4 * PIECE  # so that the tail below (3 pieces) is shorter than one interval
    monkeypatch.setattr(_storage, "WRITEBACK_EVERY", every)
    data, handle = write_file(tmp_path, 2 * every + 3 * PIECE)
    handle.fsync()  # type: ignore[attr-defined]
    handle.close()  # type: ignore[attr-defined]
    ranges = [(offset, length) for _, offset, length, _ in fake.calls]
    assert ranges == [(0, every), (every, every)]
    assert {flags for *_, flags in fake.calls} == {2}  # SYNC_FILE_RANGE_WRITE only: no wait
    assert (tmp_path / "payload").read_bytes() == data


def test_small_files_start_no_writeback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSyncFileRange()
    monkeypatch.setattr(_storage, "_sync_file_range", fake)
    _, handle = write_file(tmp_path, WRITEBACK_EVERY - PIECE)
    handle.fsync()  # type: ignore[attr-defined]
    handle.close()  # type: ignore[attr-defined]
    assert fake.calls == []


def test_writeback_error_fails_the_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_storage, "_sync_file_range", FakeSyncFileRange(errno.EIO))
    _, handle = write_file(tmp_path, WRITEBACK_EVERY + PIECE)
    with pytest.raises(OSError) as caught:
        handle.fsync()  # type: ignore[attr-defined]
    assert caught.value.errno == errno.EIO
    handle.close()  # type: ignore[attr-defined]


def test_close_without_fsync_does_not_raise_the_writeback_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a save that fails mid-payload closes the handle; its first error is what counts)
    monkeypatch.setattr(_storage, "_sync_file_range", FakeSyncFileRange(errno.EIO))
    _, handle = write_file(tmp_path, WRITEBACK_EVERY + PIECE)
    handle.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_unsupported_writeback_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    monkeypatch.setattr(_storage, "_sync_file_range", FakeSyncFileRange(code))
    data, handle = write_file(tmp_path, 2 * WRITEBACK_EVERY)
    handle.fsync()  # type: ignore[attr-defined]
    handle.close()  # type: ignore[attr-defined]
    assert (tmp_path / "payload").read_bytes() == data


@pytest.mark.skipif(_storage._sync_file_range is None, reason="no sync_file_range in libc")
def test_real_sync_file_range_is_callable(tmp_path: Path) -> None:
    # The ctypes signature is right and this file system accepts the call.
    path = tmp_path / "probe"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _storage._sync_file_range(fd, 0, 8192, 2) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    data, handle = write_file(tmp_path, WRITEBACK_EVERY + PIECE)
    handle.fsync()  # type: ignore[attr-defined]
    handle.close()  # type: ignore[attr-defined]
    assert (tmp_path / "payload").read_bytes() == data
