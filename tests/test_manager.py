"""CheckpointManager (issue 4): every numbered case, plus the surrounding rules.

Expected values are worked out by hand in each test; the disk is inspected with `os`
calls, not with ckptstore's own scan, wherever the test is about what is on disk.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptstore
from ckptstore import (
    CheckpointManager,
    LockedError,
    SaveRefusedError,
    WriterClosedError,
)
from ckptstore._storage import LocalStorage
from ckptstore.errors import CheckpointNotFoundError

MANIFEST = "manifest.json"


def state_of(step: int) -> dict[str, Any]:
    return {"w": torch.full((4,), float(step)), "step": step, "tag": f"s{step}"}


def assert_state(loaded: Any, step: int) -> None:
    assert loaded is not None, f"expected the state of step {step}, got None"
    assert loaded["step"] == step
    assert loaded["tag"] == f"s{step}"
    assert torch.equal(loaded["w"], torch.full((4,), float(step)))


def name(step: int) -> str:
    return f"step-{step:09d}"


def on_disk(run: Path) -> set[str]:
    """Committed checkpoint directories, by name (a directory holding a manifest)."""
    return {
        p.name
        for p in run.iterdir()
        if not p.name.startswith(".") and not p.is_symlink() and (p / MANIFEST).is_file()
    }


def pointer(run: Path, which: str) -> str | None:
    """What a pointer names: a link's target or a pointer file's content."""
    path = run / which
    if path.is_symlink():
        return os.readlink(path)
    if path.is_file():
        return path.read_text().strip()
    return None


def payload_file(checkpoint: Path) -> Path:
    (payload,) = [p for p in checkpoint.iterdir() if p.name != MANIFEST]
    return payload


def save_all(
    manager: CheckpointManager, values: dict[int, float | None], metric: str = "val_loss"
) -> None:
    for step, value in values.items():
        metrics = {} if value is None else {metric: value}
        manager.save(step, state_of(step), metrics=metrics)
    manager.wait()


# -- case 1: the manifests are the truth ---------------------------------------------------
def test_steps_order_by_manifest_step_not_by_name(tmp_path: Path) -> None:
    run = tmp_path / "run"
    steps = [9, 10, 120000, 1000000]
    with CheckpointManager(run, name_format="iter-{step}") as manager:
        for step in steps:
            manager.save(step, state_of(step))
    # Sorted as names these are iter-10, iter-1000000, iter-120000, iter-9.
    assert sorted(on_disk(run)) == ["iter-10", "iter-1000000", "iter-120000", "iter-9"]

    with CheckpointManager(run, keep_last=2, name_format="iter-{step}") as manager:
        assert manager.steps() == [9, 10, 120000, 1000000]
        assert manager.latest_step == 1000000
        assert_state(manager.load(), 1000000)
        manager.save(2000000, state_of(2000000))
        manager.wait()
        assert manager.steps() == [1000000, 2000000]
    assert on_disk(run) == {"iter-1000000", "iter-2000000"}


def test_steps_order_across_mixed_name_formats(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, name_format="ckpt_{step:03d}") as manager:
        manager.save(7, state_of(7))
        manager.save(11, state_of(11))
    with CheckpointManager(run, name_format="x{step}") as manager:
        manager.save(100, state_of(100))
    with CheckpointManager(run, read_only=True) as manager:
        assert manager.steps() == [7, 11, 100]
        assert_state(manager.load(), 100)


def test_foreign_entries_are_reported_ignored_and_never_deleted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "handpicked").mkdir()
    (run / "handpicked" / "model.pt").write_bytes(b"the user's own copy")
    (run / "notes.txt").write_text("lr 3e-4 looked best\n")
    (run / "no-manifest").mkdir()
    (run / "no-manifest" / "model.safetensors").write_bytes(b"\0" * 16)
    (run / "step-000000099").mkdir()  # looks like ours, but has no manifest

    foreign = {"handpicked", "notes.txt", "no-manifest", "step-000000099"}
    with CheckpointManager(run, keep_last=1) as manager:
        assert set(manager.scan().foreign) == foreign
        assert manager.steps() == []
        assert manager.load() is None
        for step in (100, 101, 102):
            manager.save(step, state_of(step))
        manager.wait()
        manager.save(100, state_of(100), overwrite=True)  # rollback retires 100..102
        manager.wait()
        assert manager.steps() == [100]

    with CheckpointManager(run, keep_last=1) as manager:
        assert set(manager.scan().foreign) == foreign
    assert (run / "handpicked" / "model.pt").read_bytes() == b"the user's own copy"
    assert (run / "notes.txt").read_text() == "lr 3e-4 looked best\n"
    assert (run / "no-manifest" / "model.safetensors").stat().st_size == 16
    assert (run / "step-000000099").is_dir()


# -- case 2: retention after commit --------------------------------------------------------
def test_issue_case_keep_last_2_keep_best_1(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, keep_last=2, keep_best=1, metric="val_loss", mode="min") as m:
        save_all(m, {1: 0.5, 2: 0.3, 3: 0.4, 4: 0.45, 5: 0.6})
        assert m.steps() == [2, 4, 5]
        assert m.latest_step == 5
        assert m.best_step == 2
    assert on_disk(run) == {name(2), name(4), name(5)}
    assert pointer(run, "latest") == name(5)
    assert pointer(run, "best") == name(2)


def test_keep_last_none_keeps_everything(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, keep_last=None, keep_best=1, metric="loss") as manager:
        save_all(manager, {s: float(s) for s in range(1, 8)}, "loss")
    assert on_disk(run) == {name(s) for s in range(1, 8)}


@pytest.mark.parametrize("bad", [0, -1, -3])
def test_keep_last_zero_or_negative_is_refused(tmp_path: Path, bad: int) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path / "run", keep_last=bad)
    # Refused at construction: no lock left held, so a valid manager opens at once.
    with CheckpointManager(tmp_path / "run", keep_last=1):
        pass


def test_keep_best_without_metric_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metric"):
        CheckpointManager(tmp_path / "run", keep_last=1, keep_best=1)


def test_retention_deletes_through_trash_after_the_commit(tmp_path: Path) -> None:
    run = tmp_path / "run"
    storage = LocalStorage(run)
    events: list[tuple[str, str, str]] = []
    original = storage.rename

    def spy(src: str, dst: str) -> None:
        events.append(("rename", src, dst))
        original(src, dst)

    storage.rename = spy  # type: ignore[method-assign]
    run.mkdir()
    with CheckpointManager(run, keep_last=1, storage=storage) as manager:
        save_all(manager, {1: None, 2: None})
    renames = [(src, dst) for _, src, dst in events]
    commit_2 = next(i for i, (_, dst) in enumerate(renames) if dst == name(2))
    retire_1 = next(i for i, (src, _) in enumerate(renames) if src == name(1))
    assert commit_2 < retire_1, "step 1 was retired before step 2 was committed"
    assert renames[retire_1][1].startswith(".trash-")
    assert on_disk(run) == {name(2)}
    assert not [p for p in os.listdir(run) if p.startswith((".trash-", ".tmp-"))]


def test_retention_never_counts_or_deletes_unsound_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as manager:
        save_all(manager, {1: None, 2: None})
    payload_file(run / name(2)).write_bytes(b"")  # step 2 is now unsound
    with CheckpointManager(run, keep_last=1) as manager:
        assert manager.steps() == [1]
        manager.save(3, state_of(3))
        manager.wait()
        # keep_last=1 over the sound ones {1, 3}: 1 goes; unsound 2 is left for people.
        assert manager.steps() == [3]
    assert on_disk(run) == {name(2), name(3)}


# -- case 3: best by metric ----------------------------------------------------------------
def test_issue_case_keep_last_1_keep_best_2_wer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, keep_last=1, keep_best=2, metric="wer", mode="min") as m:
        save_all(m, {1: 10.385, 2: 10.238, 3: 9.965}, "wer")
        kept = {i.metrics["wer"] for i in m.checkpoints()}
        assert kept == {9.965, 10.238}
        assert m.best_step == 3
    assert pointer(run, "best") == name(3)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_metric_never_becomes_best_but_counts_for_keep_last(
    tmp_path: Path, bad: float, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, keep_last=2, metric="loss", mode="min") as manager:
        save_all(manager, {1: 0.5}, "loss")
        with caplog.at_level(logging.WARNING, logger="ckptstore"):
            save_all(manager, {2: bad, 3: bad}, "loss")
        assert manager.best_step == 1
        # keep_last=2 keeps 2 and 3 (non-finite, still counted); 1 stays as the best.
        assert manager.steps() == [1, 2, 3]
        save_all(manager, {4: bad}, "loss")
        assert manager.steps() == [1, 3, 4]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # steps 2, 3 and 4
    assert all("best" in r.getMessage() and "loss" in r.getMessage() for r in warnings)
    assert pointer(run, "best") == name(1)


def test_only_non_finite_metrics_mean_no_best(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, keep_last=1, metric="loss", mode="max") as manager:
        save_all(manager, {1: math.nan, 2: math.inf}, "loss")
        assert manager.best_step is None
        assert manager.load("best") is None
        assert manager.steps() == [2]
    assert pointer(run, "best") is None
    assert pointer(run, "latest") == name(2)


def test_missing_metric_is_never_best(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, keep_last=1, keep_best=1, metric="loss") as manager:
        with caplog.at_level(logging.WARNING, logger="ckptstore"):
            manager.save(1, state_of(1), metrics={"accuracy": 0.0})
        assert "step 1: metrics have no 'loss' (they have ['accuracy'])" in caplog.text
        manager.wait()
        assert manager.best_step is None  # never treated as 0
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ckptstore"):
            manager.save(2, state_of(2), metrics={"loss": 3.0})
            manager.save(3, state_of(3))  # no metrics at all: a mid-epoch save, no warning
        assert "metrics have no" not in caplog.text
        manager.wait()
        assert manager.best_step == 2
        assert manager.steps() == [2, 3]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_tie_keeps_the_earlier_step_as_best(tmp_path: Path, mode: str) -> None:
    # The _retention docstring: on a tie the earlier step wins.
    run = tmp_path / "run"
    options: dict[str, Any] = {"keep_last": 1, "keep_best": 1, "metric": "m", "mode": mode}
    with CheckpointManager(run, **options) as m:
        save_all(m, {1: 0.5, 2: 0.5, 3: 0.5}, "m")
        assert m.best_step == 1
        assert m.steps() == [1, 3]
    assert pointer(run, "best") == name(1)


def test_best_survives_a_restart(tmp_path: Path) -> None:
    run = tmp_path / "run"
    kwargs: dict[str, Any] = dict(keep_last=1, keep_best=1, metric="val_loss", mode="min")
    with CheckpointManager(run, **kwargs) as manager:
        save_all(manager, {3: 0.4, 4: 0.3, 5: 0.2})
    with CheckpointManager(run, **kwargs) as manager:
        assert manager.best_step == 5
        save_all(manager, {6: 0.5})
        assert manager.best_step == 5
        assert manager.steps() == [5, 6]
        assert_state(manager.load("best"), 5)
    assert pointer(run, "best") == name(5)


# -- case 4: pointers ----------------------------------------------------------------------
def test_pointers_are_relative_links_that_work_from_any_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, keep_last=2, keep_best=1, metric="loss") as manager:
        save_all(manager, {1: 0.1, 2: 0.5, 3: 0.7}, "loss")
    assert (run / "latest").is_symlink() and (run / "best").is_symlink()
    assert os.readlink(run / "latest") == name(3)  # relative: no slash at all
    assert os.readlink(run / "best") == name(1)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    moved = tmp_path / "moved"
    run.rename(moved)
    assert json.loads((moved / "latest" / MANIFEST).read_text())["step"] == 3
    with CheckpointManager("../moved", read_only=True) as manager:
        assert_state(manager.load("latest"), 3)
        assert_state(manager.load("best"), 1)


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_pointer_file_replaces_links_where_links_are_refused(tmp_path: Path, code: int) -> None:
    run = tmp_path / "run"
    run.mkdir()
    storage = LocalStorage(run)
    renames: list[tuple[str, str]] = []
    rename = storage.rename

    def no_links(target: str, path: str) -> None:
        raise OSError(code, os.strerror(code), path)

    def spy(src: str, dst: str) -> None:
        renames.append((src, dst))
        rename(src, dst)

    storage.symlink = no_links  # type: ignore[method-assign]
    storage.rename = spy  # type: ignore[method-assign]
    with CheckpointManager(run, keep_last=1, metric="loss", storage=storage) as manager:
        save_all(manager, {1: 0.2, 2: 0.9}, "loss")
        assert_state(manager.load("latest"), 2)
        assert_state(manager.load("best"), 1)
    for which, step in (("latest", 2), ("best", 1)):
        assert not (run / which).is_symlink()
        assert (run / which).read_text().strip() == name(step)
        # Written under a temporary name and renamed over: never a half-written pointer.
        assert any(src.startswith(".tmp-") and dst == which for src, dst in renames)
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")]
    with CheckpointManager(run, read_only=True) as manager:
        assert_state(manager.load("latest"), 2)
        assert_state(manager.load("best"), 1)


@pytest.mark.parametrize("failing", ["symlink", "pointer-rename"])
def test_pointer_failure_never_fails_a_save(
    tmp_path: Path, failing: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    storage = LocalStorage(run)
    rename = storage.rename

    def broken_symlink(target: str, path: str) -> None:
        raise OSError(errno.EIO, "I/O error", path)

    def broken_rename(src: str, dst: str) -> None:
        if dst in ("latest", "best"):
            raise OSError(errno.EIO, "I/O error", dst)
        rename(src, dst)

    if failing == "symlink":
        storage.symlink = broken_symlink  # type: ignore[method-assign]
    else:
        storage.rename = broken_rename  # type: ignore[method-assign]
    with (
        caplog.at_level(logging.WARNING, logger="ckptstore"),
        CheckpointManager(run, keep_last=2, metric="loss", storage=storage) as manager,
    ):
        handle = manager.save(1, state_of(1), metrics={"loss": 1.0})
        handle.wait()
        manager.save(2, state_of(2), metrics={"loss": 2.0})
        manager.wait()
        assert manager.steps() == [1, 2]
        assert_state(manager.load(), 2)
        assert_state(manager.load("latest"), 2)  # no pointer: derived from manifests
        assert_state(manager.load("best"), 1)
    assert on_disk(run) == {name(1), name(2)}
    assert not (run / "latest").exists()
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")]
    assert any("pointer" in r.getMessage() for r in caplog.records)


def test_dangling_pointer_warns_and_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, metric="loss") as manager:
        save_all(manager, {1: 0.3, 2: 0.1}, "loss")
    for which in ("latest", "best"):
        (run / which).unlink()
        os.symlink("step-000000777", run / which)
    with (
        caplog.at_level(logging.WARNING, logger="ckptstore"),
        CheckpointManager(run, metric="loss", read_only=True) as manager,
    ):
        assert_state(manager.load("latest"), 2)
        assert_state(manager.load("best"), 2)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for which in ("latest", "best"):
        assert any(which in m and "step-000000777" in m for m in messages), messages


def test_pointer_out_of_the_run_directory_is_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as manager:
        save_all(manager, {1: None, 2: None})
    with CheckpointManager(tmp_path / "other") as other:
        save_all(other, {50: None})
    (run / "latest").unlink()
    os.symlink(str(tmp_path / "other" / name(50)), run / "latest")
    with (
        caplog.at_level(logging.WARNING, logger="ckptstore"),
        CheckpointManager(run, read_only=True) as manager,
    ):
        assert_state(manager.load("latest"), 2)
    assert any("latest" in r.getMessage() for r in caplog.records)


def test_load_of_a_step_never_reads_a_pointer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    storage = LocalStorage(run)
    touched: list[str] = []
    for method in ("kind", "readlink", "read_bytes", "open_read", "size"):
        original = getattr(storage, method)

        def spy(path: str, *args: Any, _original: Any = original) -> Any:
            touched.append(path)
            return _original(path, *args)

        setattr(storage, method, spy)
    with CheckpointManager(run, metric="loss", storage=storage) as manager:
        save_all(manager, {1: 0.5, 2: 0.4, 3: 0.6}, "loss")
        touched.clear()
        assert_state(manager.load(step=2), 2)
        assert_state(manager.load(2), 2)
        with pytest.raises(CheckpointNotFoundError):
            manager.load(step=9)
    pointers_read = [p for p in touched if p.split("/")[0] in ("latest", "best")]
    assert pointers_read == []
    assert touched, "the spy saw nothing: it is not wired to the manager's storage"


def test_writer_open_repairs_stale_and_dangling_pointers(tmp_path: Path) -> None:
    # What a kill between a commit (or a retirement) and the pointer update leaves.
    run = tmp_path / "run"
    with CheckpointManager(run, metric="loss") as manager:
        save_all(manager, {1: 0.5, 2: 0.1, 3: 0.9}, "loss")
    (run / "latest").unlink()
    os.symlink(name(1), run / "latest")  # stale
    (run / "best").unlink()
    os.symlink("step-000000004", run / "best")  # dangling
    with CheckpointManager(run, metric="loss"):
        assert pointer(run, "latest") == name(3)
        assert pointer(run, "best") == name(2)


def test_garbage_pointer_file_never_fails_a_save(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_bytes(b"x" * 10_000)  # larger than any pointer file
    (run / "best").write_bytes(b"../../etc\n")
    with CheckpointManager(run, metric="loss") as manager:
        save_all(manager, {1: 0.5}, "loss")
        assert_state(manager.load("latest"), 1)
        assert_state(manager.load("best"), 1)
    assert pointer(run, "latest") == name(1)
    assert pointer(run, "best") == name(1)


# -- case 5: one writer, many readers ------------------------------------------------------
def test_second_writer_fails_at_once_naming_pid_and_host(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run):
        started = time.monotonic()
        with pytest.raises(LockedError) as caught:
            CheckpointManager(run)
        assert time.monotonic() - started < 2.0
    message = str(caught.value)
    assert str(os.getpid()) in message
    assert socket.gethostname() in message
    assert isinstance(caught.value, OSError)
    with CheckpointManager(run):  # released on close
        pass


def test_read_only_manager_takes_no_lock_and_deletes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as manager:
        save_all(manager, {1: None, 2: None})
    (run / ".tmp-step-000000003-deadbeef0000").mkdir()
    (run / ".trash-step-000000000-deadbeef0000").mkdir()
    (run / ".tmp-latest-deadbeef0000").write_text("x")
    before = sorted(os.listdir(run))

    with CheckpointManager(run, keep_last=1, read_only=True) as reader:
        with CheckpointManager(run) as writer:  # the lock is free
            with CheckpointManager(run, read_only=True) as second_reader:
                assert second_reader.steps() == [1, 2]
            leftovers = [p for p in os.listdir(run) if p.startswith((".tmp-", ".trash-"))]
            assert leftovers == []  # the writer cleaned up, under its lock
            assert writer.steps() == [1, 2]
        assert_state(reader.load(1), 1)
        with pytest.raises(WriterClosedError):
            reader.save(3, state_of(3))
    assert on_disk(run) == {name(1), name(2)}
    assert ".tmp-latest-deadbeef0000" in before


def test_read_only_manager_leaves_leftovers_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as manager:
        save_all(manager, {1: None})
    os.remove(run / ".lock")
    os.remove(run / ".lock.owner")
    (run / ".tmp-step-000000002-deadbeef0000").mkdir()
    before = sorted(os.listdir(run))
    with CheckpointManager(run, keep_last=1, read_only=True) as manager:
        assert_state(manager.load(), 1)
    assert sorted(os.listdir(run)) == before  # no .lock, no .lock.owner, nothing removed


def test_read_only_manager_of_a_missing_directory_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        CheckpointManager(tmp_path / "absent", read_only=True)
    assert not (tmp_path / "absent").exists()


# -- case 6: rollback ----------------------------------------------------------------------
def test_rollback_is_refused_without_overwrite(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as manager:
        save_all(manager, {10: None, 20: None})
        for step in (20, 15, 0):
            with pytest.raises(SaveRefusedError, match="overwrite=True"):
                manager.save(step, state_of(step))
        assert manager.steps() == [10, 20]
        # A pending (not yet committed) step counts too.
        manager.save(30, state_of(30))
        with pytest.raises(SaveRefusedError):
            manager.save(25, state_of(25))
        manager.wait()
    assert on_disk(run) == {name(10), name(20), name(30)}


def test_rollback_with_overwrite_retires_later_checkpoints_first(tmp_path: Path) -> None:
    run = tmp_path / "run"
    seen_at_rename: list[set[str]] = []

    def before_rename(tmp: str) -> None:
        seen_at_rename.append(on_disk(run))

    with CheckpointManager(run, metric="loss", _before_rename=before_rename) as manager:
        save_all(manager, {10: 0.9, 20: 0.1, 30: 0.5}, "loss")
        assert manager.best_step == 20
        seen_at_rename.clear()
        manager.save(20, {"w": torch.zeros(4), "step": -20, "tag": "new"}, overwrite=True)
        manager.wait()
        assert manager.steps() == [10, 20]
        assert manager.load()["tag"] == "new"
        # The new 20 has no metric: the best is 10 now; the old best went with the branch.
        assert manager.best_step == 10
    # When the new 20 was about to be committed, 20 and 30 of the stale branch were gone.
    assert seen_at_rename == [{name(10)}]
    assert pointer(run, "latest") == name(20)
    assert pointer(run, "best") == name(10)
    with CheckpointManager(run) as manager:
        assert manager.load()["tag"] == "new"


def test_rollback_of_a_state_that_save_refuses_retires_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as manager:
        save_all(manager, {10: None, 20: None})
        with pytest.raises(TypeError):
            manager.save(15, {"bad": object()}, overwrite=True)
        assert manager.steps() == [10, 20]
    assert on_disk(run) == {name(10), name(20)}


def test_retry_after_a_failed_save_is_not_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    storage = LocalStorage(run)
    mkdir = storage.mkdir
    fail = {"on": True}

    def flaky_mkdir(path: str) -> None:
        if fail["on"]:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        mkdir(path)

    storage.mkdir = flaky_mkdir  # type: ignore[method-assign]
    with CheckpointManager(run, storage=storage) as manager:
        manager.save(5, state_of(5))
        with pytest.raises(OSError, match="No space"):
            manager.wait()
        fail["on"] = False
        manager.save(5, state_of(5))  # step 5 was never committed: not a rollback
        manager.wait()
        assert manager.steps() == [5]


# -- case 7: unsound checkpoints -----------------------------------------------------------
def test_load_skips_a_checkpoint_with_a_zero_length_payload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as manager:
        save_all(manager, {418: None, 420: None})
    payload_file(run / name(420)).write_bytes(b"")
    assert (run / name(420) / MANIFEST).is_file()
    with (
        caplog.at_level(logging.WARNING, logger="ckptstore"),
        CheckpointManager(run, read_only=True) as manager,
    ):
        assert_state(manager.load(), 418)
        assert manager.latest_step == 418
        with pytest.raises(Exception, match="bytes"):
            manager.load(step=420)
    assert any(name(420) in r.getMessage() for r in caplog.records)


def test_load_skips_a_checkpoint_whose_bytes_fail_their_checksum(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as manager:
        save_all(manager, {1: None, 2: None})
    payload = payload_file(run / name(2))
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor's bytes; the size is unchanged
    payload.write_bytes(bytes(data))
    with (
        caplog.at_level(logging.WARNING, logger="ckptstore"),
        CheckpointManager(run, read_only=True) as manager,
    ):
        assert_state(manager.load(), 1)
        assert_state(manager.load("latest"), 1)
    assert any(name(2) in r.getMessage() for r in caplog.records)


# -- case 9: exit paths --------------------------------------------------------------------
class Boom(Exception):
    pass


def test_exit_with_an_exception_waits_for_pending_saves(tmp_path: Path) -> None:
    run = tmp_path / "run"

    def slow(tmp: str) -> None:
        time.sleep(0.3)

    with (
        pytest.raises(Boom),
        CheckpointManager(run, exit_timeout=30, _before_rename=slow) as manager,
    ):
        manager.save(1, state_of(1))
        raise Boom("training blew up")
    assert on_disk(run) == {name(1)}


def test_exit_with_an_exception_is_bounded_and_never_masks_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    release = threading.Event()

    def stuck(tmp: str) -> None:
        release.wait(30)

    started = time.monotonic()
    with (
        pytest.raises(Boom, match="original"),
        CheckpointManager(run, exit_timeout=0.5, _before_rename=stuck) as manager,
    ):
        writer = manager._writer
        assert writer is not None
        manager.save(1, state_of(1))
        raise Boom("original")
    assert time.monotonic() - started < 10
    release.set()
    assert writer is not None
    writer._thread.join(30)
    assert not writer._thread.is_alive()


def test_exit_with_an_exception_does_not_mask_it_with_a_writer_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    storage = LocalStorage(run)

    def no_space(path: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", path)

    storage.mkdir = no_space  # type: ignore[method-assign]
    with (
        pytest.raises(Boom, match="original"),
        CheckpointManager(run, storage=storage) as manager,
    ):
        manager.save(1, state_of(1))
        raise Boom("original")
    with CheckpointManager(run):  # the lock was released
        pass


# -- case 10: logging ----------------------------------------------------------------------
def test_exactly_one_info_line_per_committed_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    with (
        caplog.at_level(logging.DEBUG, logger="ckptstore"),
        CheckpointManager(run, keep_last=1, metric="loss") as manager,
    ):
        save_all(manager, {1: 0.5, 2: 0.7, 3: 0.9}, "loss")
        manager.save(3, state_of(3), metrics={"loss": 0.1}, overwrite=True)
        manager.wait()
        manager.load()
    ours = [r for r in caplog.records if r.name.startswith("ckptstore")]
    infos = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    assert len(infos) == 4, infos
    for line, step in zip(infos, (1, 2, 3, 3), strict=True):
        assert f"step {step}" in line
        assert str(run / name(step)) in line
        assert "bytes" in line
    debugs = [r.getMessage() for r in ours if r.levelno == logging.DEBUG]
    # keep_last=1, best kept: after 2, nothing goes (1 is best); after 3, 2 goes.
    assert any(name(2) in m for m in debugs), debugs


# -- codec ---------------------------------------------------------------------------------
def test_zstd_round_trip_through_the_manager(tmp_path: Path) -> None:
    codec = pytest.importorskip(
        "ckptstore._codec", reason="ckptstore/_codec.py (zstd codec) is not written yet"
    )
    assert codec is not None
    run = tmp_path / "run"
    big: dict[str, Any] = {
        "w": torch.randn(256, 64),
        "b": torch.arange(1000, dtype=torch.bfloat16),
        "n": 3,
    }
    with CheckpointManager(run, codec="zstd", level=3, keep_last=2) as manager:
        manager.save(1, big)
        manager.wait()
        loaded = manager.load()
    assert loaded["n"] == 3
    assert torch.equal(loaded["w"], big["w"])
    assert torch.equal(loaded["b"], big["b"])


def test_retention_never_deletes_a_users_copy_of_a_checkpoint(tmp_path: Path) -> None:
    import shutil

    with CheckpointManager(tmp_path, keep_last=1) as manager:
        manager.save(1, {"w": torch.ones(2)})
        manager.wait()
    shutil.copytree(tmp_path / "step-000000001", tmp_path / "handpicked")
    with CheckpointManager(tmp_path, keep_last=1) as manager:
        for step in (2, 3, 4):
            manager.save(step, {"w": torch.full((2,), float(step))})
        manager.wait()
    # The library's own older checkpoints went; the hand-made copy (a manifest of step 1
    # under a name this manager would not give it) stayed, byte for byte loadable.
    assert (tmp_path / "handpicked").is_dir()
    assert not (tmp_path / "step-000000002").exists()
    assert torch.equal(ckptstore.load(tmp_path / "handpicked")["w"], torch.ones(2))


def test_a_huge_integer_metric_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager, pytest.raises(TypeError, match="too large"):
        manager.save(1, {"w": torch.ones(2)}, metrics={"loss": 10**400})
    assert not any(p.name.startswith("step-") for p in tmp_path.iterdir())
    CheckpointManager(tmp_path, read_only=True).close()  # the run still opens


def test_closing_finishes_a_retention_pass_a_crash_cut_short(tmp_path: Path) -> None:
    # Five checkpoints with keep_last=2: what a kill between commits and their retention
    # passes leaves. A session that saves nothing must still leave the bound holding.
    with CheckpointManager(tmp_path) as manager:
        for step in range(1, 6):
            manager.save(step, state_of(step))
    with CheckpointManager(tmp_path, keep_last=2) as manager:
        assert manager.steps() == [1, 2, 3, 4, 5]  # opening deletes nothing
    assert on_disk(tmp_path) == {"step-000000004", "step-000000005"}


def test_an_unreadable_checkpoint_under_the_next_name_is_moved_aside_not_deleted(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as manager:
        save_all(manager, {4: None, 5: None})
    manifest = run / name(5) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"step": 5', '"step": 6'))
    original = manifest.read_bytes()
    with CheckpointManager(run) as manager:
        assert manager.latest_step == 4  # step 5's manifest fails its checksum
        with pytest.raises(SaveRefusedError, match="overwrite=True"):
            manager.save(5, state_of(5))
        manager.save(5, state_of(5), overwrite=True)
        manager.wait()
        assert_state(manager.load(), 5)
    aside = [p for p in run.iterdir() if p.name.startswith(name(5) + ".unusable-")]
    assert len(aside) == 1 and (aside[0] / "manifest.json").read_bytes() == original


@pytest.mark.parametrize(("argument", "value"), [("max_pending", 0), ("threads", 0)])
def test_bad_writer_arguments_leave_nothing_on_disk(
    tmp_path: Path, argument: str, value: int
) -> None:
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=f"{argument} must be at least 1, not {value}"):
        CheckpointManager(run, **{argument: value})  # type: ignore[arg-type]
    assert not run.exists()


def test_loaded_step_names_what_load_returned(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run) as manager:
        assert manager.loaded_step is None and manager.load() is None
        save_all(manager, {1: None, 2: None})
        assert_state(manager.load(1), 1)
        assert manager.loaded_step == 1
        assert_state(manager.load(), 2)
        assert manager.loaded_step == 2
