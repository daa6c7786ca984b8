"""CheckpointManager under `kill -9` (issue 4, cases 8 and 3): a real child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import CheckpointManager, LockedError

REPO = str(Path(ckptstore.__file__).resolve().parent.parent)

PAUSED_WRITER = """
import sys, time
from pathlib import Path
import torch
from ckptstore import CheckpointManager

run, marker = sys.argv[1], Path(sys.argv[2])

def pause(tmp):
    # The payload and manifest are written and fsynced; the rename has not happened.
    if "step-000000200" in tmp:
        marker.write_text(tmp)
        time.sleep(600)

manager = CheckpointManager(run, keep_last=1, _before_rename=pause)
manager.save(100, {"w": torch.full((8,), 100.0), "step": 100})
manager.wait()
manager.save(200, {"w": torch.full((8,), 200.0), "step": 200})
manager.wait()
"""

KILLED_AFTER_BEST = """
import os, signal, sys
import torch
from ckptstore import CheckpointManager

manager = CheckpointManager(
    sys.argv[1], keep_last=1, keep_best=1, metric="val_loss", mode="min"
)
for step, loss in ((1, 0.6), (2, 0.5), (3, 0.4), (4, 0.3), (5, 0.2)):
    manager.save(step, {"w": torch.full((8,), float(step)), "step": step},
                 metrics={"val_loss": loss})
manager.wait()
os.kill(os.getpid(), signal.SIGKILL)
"""


def start(script: str, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_for(path: Path, child: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.poll() is not None:
            output = child.stdout.read().decode() if child.stdout else ""
            pytest.fail(f"the child exited ({child.returncode}) before pausing:\n{output}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the child never reached the pause before the rename")
        time.sleep(0.02)


def test_kill_during_a_paused_commit_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    marker = tmp_path / "paused"
    child = start(PAUSED_WRITER, str(run), str(marker))
    try:
        wait_for(marker, child)
        tmp = Path(marker.read_text())
        assert tmp.parent == run and tmp.name.startswith(".tmp-")
        assert tmp.is_dir()
        assert (tmp / "manifest.json").is_file()  # everything written but the rename
        with pytest.raises(LockedError, match=f"pid {child.pid}"):
            CheckpointManager(run)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL

    with CheckpointManager(run, keep_last=1, read_only=True) as reader:
        assert reader.latest_step == 100
        assert reader.steps() == [100]
        loaded = reader.load()
        assert loaded["step"] == 100
        assert torch.equal(loaded["w"], torch.full((8,), 100.0))
        assert reader.load("latest")["step"] == 100
    names = os.listdir(run)
    assert not [n for n in names if "200" in n and not n.startswith(".tmp-")]
    assert tmp.is_dir(), "a read-only manager must not clean up"

    with CheckpointManager(run, keep_last=1) as writer:  # the kernel released the lock
        assert not tmp.exists()
        assert not [n for n in os.listdir(run) if n.startswith((".tmp-", ".trash-"))]
        assert writer.steps() == [100]
        assert os.readlink(run / "latest") == "step-000000100"


def test_best_survives_a_kill(tmp_path: Path) -> None:
    run = tmp_path / "run"
    child = start(KILLED_AFTER_BEST, str(run))
    output, _ = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, output.decode()

    with CheckpointManager(run, keep_last=1, keep_best=1, metric="val_loss") as manager:
        assert manager.best_step == 5
        manager.save(6, {"w": torch.zeros(8), "step": 6}, metrics={"val_loss": 0.5})
        manager.wait()
        assert manager.best_step == 5
        assert manager.latest_step == 6
        assert manager.steps() == [5, 6]
        assert manager.load("best")["step"] == 5
    assert os.readlink(run / "best") == "step-000000005"
