"""Injected faults: a full disk, a failing fsync or rename, a read-only or vanished directory.

Each time: the error reaches the caller (the save's handle, `wait()`, or the next
`save()`), the checkpoints saved before are byte-identical and load, nothing partial is
visible, and the next save works once the fault is gone.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import Call, FaultyStorage, os_error, tree_bytes

from ckptstore import CheckpointManager
from ckptstore._rundir import scan
from ckptstore._storage import LocalStorage
from ckptstore._verify import verify_checkpoint

MUTATING = ("mkdir", "create", "write", "fsync", "fsync_dir", "rename", "remove_file")
MUTATING += ("remove_tree", "symlink")


def state_of(step: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 64, generator=gen), "b": torch.arange(step + 5), "step": step}


def fail_nth(kind: str | tuple[str, ...], n: int, code: int) -> Callable[[Call], OSError | None]:
    """Fail the n-th call (from 0) of `kind`, once; every other call goes through."""
    seen = [0]

    def fail(call: Call) -> OSError | None:
        if call[0] not in (kind if isinstance(kind, tuple) else (kind,)):
            return None
        seen[0] += 1
        return os_error(code, str(call[1])) if seen[0] == n + 1 else None

    return fail


def checkpoints(run: Path) -> dict[str, bytes]:
    """Every file of every committed checkpoint, for byte-identity checks."""
    return {k: v for k, v in tree_bytes(run).items() if k.startswith("step-")}


def assert_sound_run(run: Path, before: dict[str, bytes], manager: CheckpointManager) -> None:
    """Earlier checkpoints byte-identical and loadable; nothing partial visible."""
    now = checkpoints(run)
    assert {k: now.get(k) for k in before} == before
    storage = LocalStorage(run)
    found = scan(storage)
    assert not found.broken and not found.foreign
    assert not found.leftovers, "a failed save left its temporary directory behind"
    for info in found.checkpoints.values():
        assert verify_checkpoint(storage, info.name, deep=True).sound
    for name in {k.split("/")[0] for k in before}:
        step = int(name.removeprefix("step-"))
        assert manager.load(step)["step"] == step


def count_calls(storage: FaultyStorage, manager: CheckpointManager, step: int) -> list[Call]:
    """The calls one successful save (with its pointers and retention) makes."""
    manager.wait()
    first = len(storage.calls)
    manager.save(step, state_of(step))
    manager.wait()
    return [c for c in storage.calls[first:] if c[0] in MUTATING]


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="ckptstore")


def open_manager(run: Path, storage: Any, codec: str = "zstd") -> CheckpointManager:
    return CheckpointManager(run, codec=codec, chunk_size=4096, threads=1, storage=storage)


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_enospc_at_every_write_position_fails_the_save_and_nothing_else(
    tmp_path: Path, codec: str
) -> None:
    run = tmp_path / "run"
    storage = FaultyStorage(run.mkdir() or run)
    with open_manager(run, storage, codec) as manager:
        manager.save(1, state_of(1))
        writes = [c for c in count_calls(storage, manager, 2) if c[0] == "write"]
        assert len(writes) >= 4  # the payload is several chunks, then the manifest
        step = 2
        for position in range(len(writes)):
            before = checkpoints(run)
            step += 1
            storage.fail = fail_nth("write", position, errno.ENOSPC)
            handle = manager.save(step, state_of(step))
            with pytest.raises(OSError) as caught:
                handle.wait()
            assert caught.value.errno == errno.ENOSPC, position
            storage.fail = None
            assert_sound_run(run, before, manager)
            step += 1
            manager.save(step, state_of(step)).wait()  # the fault is gone: saving works
            assert manager.load()["step"] == step


def test_enospc_reaches_the_next_save_when_nobody_waits(tmp_path: Path) -> None:
    run = tmp_path / "run"
    storage = FaultyStorage(run.mkdir() or run, enospc_after=1000)
    with open_manager(run, storage) as manager:
        manager.save(1, state_of(1))
        with pytest.raises(OSError) as caught:
            manager.save(2, state_of(2))  # may block on the first, then re-raise its error
            manager.save(3, state_of(3))
        assert caught.value.errno == errno.ENOSPC
        storage.enospc_after = None
        manager.wait()  # reported once already: no second raise
        manager.save(4, state_of(4)).wait()
        assert manager.steps() == [4]


def test_eio_on_each_fsync_of_the_commit_fails_the_save(tmp_path: Path) -> None:
    run = tmp_path / "run"
    storage = FaultyStorage(run.mkdir() or run)
    with open_manager(run, storage) as manager:
        manager.save(1, state_of(1))
        calls = count_calls(storage, manager, 2)
        syncs = [c for c in calls if c[0] in ("fsync", "fsync_dir")]
        commit_syncs = syncs[:4]  # payload, manifest, temporary directory, run directory
        assert [c[0] for c in commit_syncs] == ["fsync", "fsync", "fsync_dir", "fsync_dir"]
        step = 2
        for position in range(len(commit_syncs)):
            before = checkpoints(run)
            step += 1
            storage.fail = fail_nth(("fsync", "fsync_dir"), position, errno.EIO)
            with pytest.raises(OSError) as caught:
                manager.save(step, state_of(step)).wait()
            assert caught.value.errno == errno.EIO
            storage.fail = None
            # A failed fsync of the run directory comes after the rename: the checkpoint
            # is complete (every file was fsynced) and may be visible; it must be sound.
            assert_sound_run(run, before, manager)
            step += 1
            manager.save(step, state_of(step)).wait()


def test_a_failing_pointer_fsync_never_fails_the_save(tmp_path: Path) -> None:
    run = tmp_path / "run"
    storage = FaultyStorage(run.mkdir() or run)
    with open_manager(run, storage) as manager:
        manager.save(1, state_of(1)).wait()
        storage.fail = fail_nth("fsync_dir", 2, errno.EIO)  # the `latest` pointer's
        manager.save(2, state_of(2)).wait()
        storage.fail = None
        assert manager.load()["step"] == 2


@pytest.mark.parametrize("code", [errno.EIO, errno.EXDEV, errno.EACCES])
def test_a_failing_rename_leaves_no_trace(tmp_path: Path, code: int) -> None:
    run = tmp_path / "run"
    storage = FaultyStorage(run.mkdir() or run)
    with open_manager(run, storage) as manager:
        manager.save(1, state_of(1)).wait()
        before = checkpoints(run)
        storage.fail = fail_nth("rename", 0, code)
        with pytest.raises(OSError) as caught:
            manager.save(2, state_of(2)).wait()
        assert caught.value.errno == code
        storage.fail = None
        assert_sound_run(run, before, manager)
        assert manager.steps() == [1]
        manager.save(3, state_of(3)).wait()
        assert manager.steps() == [1, 3]


def read_only(call: Call) -> OSError | None:
    return os_error(errno.EROFS, str(call[1])) if call[0] in MUTATING else None


def test_a_read_only_directory_refuses_the_save_cleanly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    storage = FaultyStorage(run.mkdir() or run)
    with open_manager(run, storage) as manager:
        manager.save(1, state_of(1)).wait()
        before = tree_bytes(run)
        storage.fail = read_only
        with pytest.raises(OSError) as caught:
            manager.save(2, state_of(2)).wait()
        assert caught.value.errno == errno.EROFS
        assert tree_bytes(run) == before  # not one byte changed
        storage.fail = None
        assert_sound_run(run, checkpoints(run), manager)
        manager.save(3, state_of(3)).wait()
        assert manager.steps() == [1, 3]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555")
def test_a_chmod_read_only_directory_refuses_the_save_cleanly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with open_manager(run, None) as manager:
        manager.save(1, state_of(1)).wait()
        before = tree_bytes(run)
        run.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            with pytest.raises(PermissionError):
                manager.save(2, state_of(2)).wait()
        finally:
            run.chmod(stat.S_IRWXU)
        assert tree_bytes(run) == before
        manager.save(3, state_of(3)).wait()
        assert manager.steps() == [1, 3]


@pytest.mark.parametrize("when", ["before-mkdir", "before-rename"])
def test_a_run_directory_removed_during_a_save_is_not_recreated(tmp_path: Path, when: str) -> None:
    run = tmp_path / "run"
    armed = [False]

    def remove_run(*_: object) -> None:
        if armed[0]:
            shutil.rmtree(run)

    def before_mkdir(call: Call) -> None:
        if call[0] == "mkdir":
            remove_run()

    storage = FaultyStorage(run.mkdir() or run, fail=None)
    manager = CheckpointManager(
        run,
        threads=1,
        storage=storage,
        _before_rename=remove_run if when == "before-rename" else None,
    )
    manager.save(1, state_of(1)).wait()
    armed[0] = True
    if when == "before-mkdir":
        storage.fail = before_mkdir  # type: ignore[assignment]
    with pytest.raises(FileNotFoundError) as caught:
        manager.save(2, state_of(2)).wait()
    assert str(run) in str(caught.value)  # the message names where
    assert not run.exists(), "a partial tree was re-created"
    with pytest.raises(FileNotFoundError):
        manager.save(3, state_of(3))  # still gone: refused at once, nothing created
    assert not run.exists()
    manager.close()
    assert not run.exists()
