"""Exact resume across real process deaths, and the pre-emption path, in subprocesses.

Every run is `tests/scripts/train_run.py`: 2 epochs x 10 steps, dropout, a shuffled
loader whose samples draw from all three global generators, a checkpoint every 4
steps and at each epoch's end. The expected losses and weights come from the same
script run once without faults.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import CheckpointManager

SCRIPTS = Path(__file__).resolve().parent / "scripts"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


class Zygote:
    """Runs of train_run.py as fresh forked processes (see scripts/zygote.py for why)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "zygote.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )

    def _read(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def start(self, stderr: Path, *argv: str | Path) -> int:
        """Start a run; its pid. Call `status()` before the next run."""
        assert self.process.stdin is not None
        request = {"argv": [str(a) for a in argv], "stderr": str(stderr)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return int(self._read()["pid"])

    def status(self) -> int:
        """Wait for the run to end: its exit code, or minus the signal that killed it."""
        return int(self._read()["status"])

    def run(self, stderr: Path, *argv: str | Path) -> int:
        self.start(stderr, *argv)
        return self.status()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    server = Zygote()
    yield server
    server.close()


def losses(loss_log: Path) -> list[tuple[int, str]]:
    lines = [line.split() for line in loss_log.read_text().splitlines()]
    return [(int(line[0]), line[1]) for line in lines if line[0] not in ("resume", "done")]


def resumes(loss_log: Path) -> list[tuple[int, int, int]]:
    lines = [line.split() for line in loss_log.read_text().splitlines()]
    return [(int(line[1]), int(line[2]), int(line[3])) for line in lines if line[0] == "resume"]


def final_state(run_dir: Path, step: int) -> dict:
    with CheckpointManager(run_dir, read_only=True) as manager:
        return manager.load(step)


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), key


def test_kill9_at_any_point_resumes_bitwise_equal_to_uninterrupted_run(
    tmp_path: Path, zygote: Zygote
) -> None:
    reference = tmp_path / "reference"
    assert zygote.run(tmp_path / "reference.err", reference / "run", reference / "loss.log") == 0

    faulty = tmp_path / "faulty"
    command = (faulty / "run", faulty / "loss.log", "--kill-at", "6,13,17", "--kill-in-write", "8")
    statuses = [zygote.run(tmp_path / "faulty.err", *command) for _ in range(5)]
    assert statuses == [-signal.SIGKILL] * 4 + [0], (tmp_path / "faulty.err").read_text()

    # Killed at 6 -> resumes from 4; killed while step 8 is written -> 4 again; at 13 ->
    # 12 (epoch 1, batch 2); at 17 -> 16 (batch 6: the count kept growing after a resume).
    assert resumes(faulty / "loss.log") == [(0, 0, 0), (4, 0, 4), (4, 0, 4), (12, 1, 2), (16, 1, 6)]
    expected = dict(losses(reference / "loss.log"))
    assert sorted(expected) == list(range(1, 21))
    seen = losses(faulty / "loss.log")
    assert {step for step, _ in seen} == set(expected)
    for step, loss in seen:  # every loss, the first time and after every resume
        assert loss == expected[step], f"step {step}"

    ours, theirs = final_state(faulty / "run", 20), final_state(reference / "run", 20)
    assert_bitwise_equal(ours["model"], theirs["model"])
    for index, per_param in theirs["optimizer"]["state"].items():
        assert_bitwise_equal(ours["optimizer"]["state"][index], per_param)
    assert ours["scheduler"] == theirs["scheduler"]
    assert ours["rng"]["python"]["state"].equal(theirs["rng"]["python"]["state"])
    assert not any(name.startswith(".tmp") for name in os.listdir(faulty / "run"))


def wait_for_step(loss_log: Path, step: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if loss_log.exists() and len(losses(loss_log)) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step}")


def test_sigterm_takes_a_final_checkpoint_and_exits_within_the_grace_period(
    tmp_path: Path, zygote: Zygote
) -> None:
    run_dir, loss_log, stderr = tmp_path / "run", tmp_path / "loss.log", tmp_path / "err"
    pid = zygote.start(stderr, run_dir, loss_log, "--sleep", "0.1", "--grace", "10")
    wait_for_step(loss_log, 5)
    sent = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    status = zygote.status()
    took = time.monotonic() - sent

    assert status == 128 + signal.SIGTERM, stderr.read_text()
    assert took < 10
    last = losses(loss_log)[-1][0]
    assert f"stopping on SIGTERM: checkpoint of step {last} committed" in stderr.read_text()
    with CheckpointManager(run_dir, read_only=True) as manager:
        assert manager.latest_step == last
        state = manager.load(last)
    assert ckptstore.verify(run_dir / f"step-{last:09d}", deep=True).sound
    epoch = (last - 1) // 10  # the loader moves on when the loop asks for batch 11
    assert state["progress"] == {"step": last, "epoch": epoch, "batch": last - 10 * epoch}


def test_sigterm_during_a_step_that_never_ends_exits_at_the_grace_period(
    tmp_path: Path, zygote: Zygote
) -> None:
    run_dir, loss_log, stderr = tmp_path / "run", tmp_path / "loss.log", tmp_path / "err"
    pid = zygote.start(stderr, run_dir, loss_log, "--hang-at", "5", "--grace", "2")
    wait_for_step(loss_log, 5)
    time.sleep(0.3)  # into the hang
    sent = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    status = zygote.status()
    took = time.monotonic() - sent

    assert status == 128 + signal.SIGTERM, stderr.read_text()
    assert took < 2.5
    assert "no step boundary within the 2s grace period" in stderr.read_text()
    assert "resume from step 4" in stderr.read_text()
    with CheckpointManager(run_dir, read_only=True) as manager:
        assert manager.steps() == [4]
    assert ckptstore.verify(run_dir / "step-000000004", deep=True).sound
