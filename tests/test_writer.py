"""The background writer: back-pressure, handles, errors re-raised once, exit behaviour."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import FaultyStorage, os_error, route_saves_through

import ckptstore
import ckptstore._api as api

REPO = Path(__file__).resolve().parent.parent
STATE = {"w": torch.ones(128, 128)}


@pytest.fixture
def gated(tmp_path: Path, monkeypatch: Any) -> FaultyStorage:
    """Saves under tmp_path go through a storage whose fsyncs wait for `gate.set()`."""
    storage = FaultyStorage(tmp_path, gate=threading.Event())
    route_saves_through(monkeypatch, storage)
    return storage


@pytest.fixture
def snapshots(monkeypatch: Any) -> list[int]:
    """Counts snapshots taken (calls of `take`)."""
    taken: list[int] = []
    real = api.take

    def counting(plan: Any, pool: Any) -> Any:
        taken.append(1)
        return real(plan, pool)

    monkeypatch.setattr(api, "take", counting)
    return taken


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


@pytest.mark.parametrize("max_pending", [1, 2])
def test_at_most_max_pending_saves_are_in_flight(
    tmp_path: Path, gated: FaultyStorage, snapshots: list[int], max_pending: int
) -> None:
    saver = ckptstore.Checkpointer(max_pending=max_pending)
    handles = [saver.save(tmp_path / f"ck{i}", STATE) for i in range(max_pending)]
    thread, out = _in_thread(lambda: saver.save(tmp_path / "extra", STATE))
    thread.join(0.3)
    assert thread.is_alive() and not out  # the next save waits for a slot...
    assert len(snapshots) == max_pending  # ...without taking its snapshot yet
    assert not any(h.done() for h in handles)

    assert gated.gate is not None
    gated.gate.set()
    thread.join(10)
    assert not thread.is_alive() and len(snapshots) == max_pending + 1
    saver.close()
    assert all(h.done() for h in [*handles, *out])
    assert sorted(os.listdir(tmp_path)) == sorted(
        [*(f"ck{i}" for i in range(max_pending)), "extra"]
    )


def test_handle_done_and_wait(tmp_path: Path, gated: FaultyStorage) -> None:
    saver = ckptstore.Checkpointer()
    handle = saver.save(tmp_path / "ck", STATE, step=5)
    assert not handle.done()
    with pytest.raises(ckptstore.PendingSaveTimeoutError) as caught:
        handle.wait(timeout=0.05)
    assert isinstance(caught.value, TimeoutError)
    assert gated.gate is not None
    gated.gate.set()
    result = handle.wait(timeout=10)
    assert handle.done() and result.step == 5 and result.name == "ck"
    assert ckptstore.verify(tmp_path / "ck", deep=True).status == "sound"
    saver.close()


def _failing_saver(tmp_path: Path, monkeypatch: Any) -> tuple[ckptstore.Checkpointer, OSError]:
    """A Checkpointer whose first save fails in the writer with EIO; waits for it."""
    error = os_error(errno.EIO, "payload")
    storage = FaultyStorage(tmp_path, fail=lambda c: error if c[0] == "fsync" else None)
    route_saves_through(monkeypatch, storage)
    saver = ckptstore.Checkpointer()
    handle = saver.save(tmp_path / "ck", STATE)
    deadline = time.monotonic() + 10
    while not handle.done() and time.monotonic() < deadline:  # done() reports nothing
        time.sleep(0.01)
    assert handle.done()
    storage.fail = None
    return saver, error


def test_writer_error_is_raised_as_itself_once_at_the_next_save(
    tmp_path: Path, monkeypatch: Any, snapshots: list[int]
) -> None:
    saver, error = _failing_saver(tmp_path, monkeypatch)
    taken = len(snapshots)
    with pytest.raises(OSError) as caught:
        saver.save(tmp_path / "next", STATE)
    assert caught.value is error and caught.value.errno == errno.EIO
    assert len(snapshots) == taken and not (tmp_path / "next").exists()  # no snapshot

    saver.save(tmp_path / "next", STATE).wait()  # once: the save after that works
    saver.wait()
    saver.close()
    assert os.listdir(tmp_path) == ["next"]


@pytest.mark.parametrize("call", ["wait", "close"])
def test_writer_error_is_raised_as_itself_once_at_wait_or_close(
    tmp_path: Path, monkeypatch: Any, call: str
) -> None:
    saver, error = _failing_saver(tmp_path, monkeypatch)
    with pytest.raises(OSError) as caught:
        getattr(saver, call)()
    assert caught.value is error
    saver.wait()
    saver.close()  # reported already: nothing more is raised


def test_an_error_reported_by_its_handle_is_not_raised_again(
    tmp_path: Path, monkeypatch: Any
) -> None:
    error = os_error(errno.EROFS)
    storage = FaultyStorage(tmp_path, fail=lambda c: error if c[0] == "mkdir" else None)
    route_saves_through(monkeypatch, storage)
    saver = ckptstore.Checkpointer()
    handle = saver.save(tmp_path / "ck", STATE)
    with pytest.raises(OSError) as caught:
        handle.wait(timeout=10)
    assert caught.value is error
    saver.close()


def test_insufficient_free_space_fails_before_writing_anything(
    tmp_path: Path, monkeypatch: Any, snapshots: list[int]
) -> None:
    storage = FaultyStorage(tmp_path)
    monkeypatch.setattr(storage, "free_bytes", lambda path: 100_000)  # state is 64 KiB + margin
    route_saves_through(monkeypatch, storage)
    with pytest.raises(ckptstore.InsufficientSpaceError) as caught:
        ckptstore.save(tmp_path / "ck", STATE)
    assert caught.value.errno == errno.ENOSPC and caught.value.needed > 128 * 128 * 4
    with ckptstore.Checkpointer() as saver, pytest.raises(ckptstore.InsufficientSpaceError):
        saver.save(tmp_path / "ck", STATE)
    assert storage.calls == [] and os.listdir(tmp_path) == [] and snapshots == []


# --- interpreter exit (subprocesses) --------------------------------------------------------

_PRELUDE = """
import errno, logging, os, sys, threading, time
import torch
from faults import FaultyStorage, os_error
from ckptstore._api import prepare
from ckptstore._format import CodecConfig
from ckptstore._writer import Writer

logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
root = sys.argv[1]

def submit(writer, storage, name):
    build = prepare(storage, name, {"w": torch.ones(64, 64)}, step=1, metrics=None,
                    metadata=None, codec=CodecConfig())
    return writer.submit(build)
"""


def _run_script(tmp_path: Path, body: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(_PRELUDE + textwrap.dedent(body))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    return subprocess.run(
        [sys.executable, str(script), str(run_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


def test_an_unreported_error_is_logged_at_error_at_exit(tmp_path: Path) -> None:
    done = _run_script(
        tmp_path,
        """
        def erofs(call):
            return os_error(errno.EROFS, call[1]) if call[0] == "mkdir" else None

        storage = FaultyStorage(root, fail=erofs)
        writer = Writer(threads=1)
        handle = submit(writer, storage, "ck")
        while not handle.done():
            time.sleep(0.01)
        print("exiting", flush=True)
        """,
    )
    assert done.returncode == 0, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "Read-only file system" in errors[0], done.stderr


def test_exit_with_a_stuck_write_is_bounded_and_leaves_only_a_temp_dir(tmp_path: Path) -> None:
    started = time.monotonic()
    done = _run_script(
        tmp_path,
        """
        storage = FaultyStorage(root, gate=threading.Event())  # fsync never returns
        writer = Writer(threads=1, exit_timeout=0.5)
        submit(writer, storage, "ck")
        print("exiting", flush=True)
        """,
    )
    assert time.monotonic() - started < 30
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "ck" in warnings[0], done.stderr
    left = os.listdir(tmp_path / "run")
    assert len(left) == 1 and left[0].startswith(".tmp-ck-"), left


def test_exit_gives_a_slow_pending_write_time_to_commit(tmp_path: Path) -> None:
    done = _run_script(
        tmp_path,
        """
        storage = FaultyStorage(root, delay=0.3)  # each fsync takes 0.3 s
        writer = Writer(threads=1, exit_timeout=30)
        submit(writer, storage, "ck")
        print("exiting", flush=True)
        """,
    )
    assert done.returncode == 0 and "WARNING" not in done.stderr, done.stderr
    assert os.listdir(tmp_path / "run") == ["ck"]
    loaded = ckptstore.load(tmp_path / "run" / "ck")
    assert torch.equal(loaded["w"], torch.ones(64, 64))
