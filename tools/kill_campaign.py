#!/usr/bin/env python3
"""kill -9 campaign: train with checkpoints, SIGKILL the trainer at random instants, resume.

    python tools/kill_campaign.py --kills 25 --seed 1 -v   # 25 kills, one line each
    python tools/kill_campaign.py --kills 1000 --seed 7    # the campaign (hours; background)

A real training process (a small MLP, AdamW, `--steps` deterministic steps) saves through
`CheckpointManager(codec="zstd", keep_last=3, keep_best=1, metric="val")` every
`--every` steps, asynchronously. The campaign kills it with SIGKILL and starts it again,
over and over; each incarnation resumes from the newest checkpoint. Half the kills are
steered into the write path: the trainer's storage (a thin wrapper passed as `storage=`)
stops before its Nth file-system effect (N random) and tells us, and we kill it within
a few milliseconds while its training thread keeps running. The other half land at a
uniformly random instant. Either way, the storage wrapper logs when the trainer enters
and leaves a write (a commit, a pointer move, a retention delete) to a status file, so
each kill is classified from what the trainer itself recorded before it died.

After every kill, from the files alone: every visible checkpoint passes deep
verification, nothing is broken or half-visible, the newest checkpoint the trainer
reported committed is there, `latest`/`best` name checkpoints that exist, retention
holds (at most keep_last + keep_best + 1 checkpoints: a kill may land between a commit
and its retention), and a fresh manager loads the newest. The next incarnation must
resume from exactly the step after it. When a run reaches its last step, its final
state must equal an uninterrupted run's bit for bit; then a new run starts, until
`--kills` kills are done.

kill -9 leaves the page cache intact: this proves the protocol is atomic under a
process crash, not that it is durable under a power cut (that is the crash-state test,
tests/test_crash_states.py). The trainers are forked from a server that has already
imported torch, so a restart costs milliseconds rather than seconds.

Exit status 0 when every check held; 1 otherwise. The summary's last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KEEP_LAST, KEEP_BEST = 3, 1
OPS_PER_SAVE = 10  # about how many file-system effects one save and its retention make


# --- the trainer (runs in the killed process) ---------------------------------------------


class SignallingStorage:
    """Passes every call to a LocalStorage; logs write windows; can stop before op N."""

    def __init__(self, inner: Any, status_fd: int, pause_at: int | None) -> None:
        self.inner = inner
        self.atomic_rename = inner.atomic_rename
        self._fd = status_fd
        self._pause_at = pause_at
        self._count = 0
        self._renamed = False

    def _say(self, line: str) -> None:
        os.write(self._fd, (line + "\n").encode())

    def _effect(self, what: str) -> None:
        self._count += 1
        if self._count == self._pause_at:
            self._say(f"P {what}")
            time.sleep(30)  # the campaign kills us here; never sleeps this long

    def __getattr__(self, name: str) -> Any:  # reads pass straight through
        return getattr(self.inner, name)

    def mkdir(self, path: str) -> None:
        if not path.startswith(".tmp-"):
            self._effect(f"mkdir {path}")
        self.inner.mkdir(path)
        if path.startswith(".tmp-"):  # steer the pause just inside the window, not before it
            self._say(f"B commit {path}")
            self._effect(f"after mkdir {path}")

    def create(self, path: str) -> Any:
        self._effect(f"create {path}")
        return self.inner.create(path)

    def symlink(self, target: str, path: str) -> None:
        self._say(f"B pointer {path}")
        self._effect(f"symlink {path}")
        self.inner.symlink(target, path)

    def rename(self, src: str, dst: str) -> None:
        if dst.startswith(".trash-"):
            self._say(f"B retire {src}")
        self._effect(f"rename {src} {dst}")
        self.inner.rename(src, dst)
        if src.startswith(".tmp-step-"):
            self._renamed = True
            self._say(f"R {dst}")

    def fsync_dir(self, path: str) -> None:
        self._effect(f"fsync_dir {path}")
        self.inner.fsync_dir(path)
        if path == ".":
            if self._renamed:
                self._renamed = False
                self._say("C")  # the commit is durable
            self._say("E")

    def remove_tree(self, path: str) -> None:
        self._effect(f"remove_tree {path}")
        self.inner.remove_tree(path)
        if path.startswith(".trash-"):
            self._say("E")

    def remove_file(self, path: str) -> None:
        self._effect(f"remove_file {path}")
        self.inner.remove_file(path)


def metric_of(step: int, every: int) -> float:
    """A validation metric that is not monotonic, so `best` is not always the newest."""
    return ((step // every) * 7919) % 101 / 101.0


def train(run: str, steps: int, every: int, status: str, pause_at: int | None) -> None:
    import torch

    from ckptstore import CheckpointManager
    from ckptstore._storage import LocalStorage

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    codec = "zstd" if _has_zstd() else "none"
    fd = os.open(status, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    storage = SignallingStorage(LocalStorage(run), fd, pause_at)
    os.makedirs(run, exist_ok=True)
    with CheckpointManager(
        run,
        codec=codec,
        keep_last=KEEP_LAST,
        keep_best=KEEP_BEST,
        metric="val",
        mode="min",
        threads=1,
        storage=storage,
    ) as manager:
        state = manager.load()
        start = 1
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optim"])
            start = state["step"] + 1
        os.write(fd, f"ready {start}\n".encode())
        for step in range(start, steps + 1):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(64, 32, generator=gen), torch.randn(64, 8, generator=gen)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % every == 0:
                state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}
                manager.save(step, state, metrics={"val": metric_of(step, every)})
    os.write(fd, b"done\n")


def _has_zstd() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


# --- the campaign (the parent) -----------------------------------------------------------


@dataclass
class Tally:
    kills: int = 0
    kills_in_write: int = 0
    steered: int = 0
    runs_completed: int = 0
    restarts: int = 0
    checkpoints_verified: int = 0
    final_states_equal: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def read_status(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def inside_write(lines: list[str]) -> bool:
    marks = [line for line in lines if line[:1] in ("B", "E")]
    return bool(marks) and marks[-1].startswith("B")


def last_committed(lines: list[str]) -> str | None:
    name = None
    for i, line in enumerate(lines):
        if line.startswith("R "):
            pending = line[2:]
            if "C" in lines[i + 1 :]:
                name = pending
    return name


def excess_allowed(lines: list[str], before: int) -> int:
    """How many checkpoints beyond keep_last + keep_best a kill may leave.

    One: a kill between a commit and its retention. Retention runs only after a commit
    (not when a manager opens), so a pass cut short stays short until a later pass
    completes, which it has once the next save starts (one writer thread, in order).
    Until then each incarnation that commits may add one more.
    """
    # A checkpoint exists from its rename ("R"), before the parent fsync marks it durable
    # ("C"): a kill between the two leaves it, with no retention pass, so it counts.
    commits = [i for i, line in enumerate(lines) if line.startswith("R ")]
    if commits and any(line.startswith("B commit") for line in lines[commits[0] :]):
        return 1
    return before + (1 if commits else 0)


def check_run(run: Path, committed: str | None, tally: Tally, allowance: int = 1) -> int | None:
    """Every invariant a kill must leave intact; returns the newest step (or None)."""
    from ckptstore import CheckpointManager
    from ckptstore._pointers import DanglingPointerError, read_pointer
    from ckptstore._rundir import scan
    from ckptstore._storage import LocalStorage
    from ckptstore._verify import verify_checkpoint

    storage = LocalStorage(run)
    found = scan(storage)
    fail = tally.failures.append
    if found.broken or found.foreign:
        fail(f"{run}: broken or partial entries visible: {found.broken or found.foreign}")
    names = {info.name for info in found.checkpoints.values()}
    for info in found.checkpoints.values():
        report = verify_checkpoint(storage, info.name, deep=True)
        tally.checkpoints_verified += 1
        if not report.sound:
            fail(f"{run}/{info.name} fails deep verification: {report.problems}")
    if committed is not None and committed not in names:
        fail(f"{run}: {committed} was committed, and is gone")
    if len(names) > KEEP_LAST + KEEP_BEST + allowance:
        fail(
            f"{run}: {len(names)} checkpoints, retention allows {KEEP_LAST + KEEP_BEST + allowance}"
        )
    for pointer in ("latest", "best"):
        try:
            target = read_pointer(storage, pointer)
        except (DanglingPointerError, OSError) as error:
            fail(f"{run}/{pointer}: {error}")
            continue
        if target is not None and target not in names:
            fail(f"{run}/{pointer} -> {target}, which is not a checkpoint")
    newest = max(found.checkpoints, default=None)
    manager = CheckpointManager(run, read_only=True)
    try:
        state = manager.load()
    except Exception as error:
        fail(f"{run}: load() failed: {error!r}")
        return newest
    finally:
        manager.close()
    got = None if state is None else state["step"]
    if got != newest:
        fail(f"{run}: load() gave step {got}, the newest checkpoint is step {newest}")
    return newest


def same_bits(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.contiguous()
            .view(-1)
            .view(torch.uint8)
            .equal(b.contiguous().view(-1).view(torch.uint8))
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_bits, a, b))
    return bool(a == b) and type(a) is type(b)


class Campaign:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.rng = random.Random(args.seed)
        self.ctx = mp.get_context("forkserver")
        self.tally = Tally()
        self.incarnations = 0
        self.run_seconds = 1.0
        self.allowance = 1

    def say(self, line: str) -> None:
        if self.args.verbose:
            print(line, flush=True)

    def start(self, run: Path, pause_at: int | None) -> tuple[Any, Path]:
        self.incarnations += 1
        status = self.root / f"status-{self.incarnations}.txt"
        args = (str(run), self.args.steps, self.args.every, str(status), pause_at)
        process = self.ctx.Process(target=train, args=args, daemon=True)
        process.start()
        return process, status

    def wait_for(self, status: Path, process: Any, prefix: str, timeout: float = 60) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in read_status(status):
                if line.startswith(prefix):
                    return line
            if not process.is_alive():
                return None
            time.sleep(0.002)
        return None

    def reference(self) -> Any:
        import ckptstore

        run = self.root / "reference"
        process, status = self.start(run, None)
        self.wait_for(status, process, "ready ", timeout=300)  # the fork server's start is slow
        began = time.monotonic()
        process.join(300)
        self.run_seconds = max(0.05, time.monotonic() - began)
        if process.exitcode != 0 or "done" not in read_status(status):
            raise SystemExit(f"the uninterrupted reference run failed ({process.exitcode})")
        return ckptstore.load(run / f"step-{self.args.steps:09d}")

    def one_kill(self, run: Path, newest: int | None) -> tuple[bool, int | None]:
        """Start a trainer, kill it; False when it finished before the kill came."""
        left = self.args.steps - (newest or 0)
        steer = self.tally.kills % 2 == 0
        # Aim at the first third of what is left: several kills per run, little waste.
        # Near the end, aim past it now and then, so runs complete and get compared.
        pause_at = self.rng.randint(
            1, max(2 * OPS_PER_SAVE, OPS_PER_SAVE * left // self.args.every // 3)
        )
        process, status = self.start(run, pause_at if steer else None)
        ready = self.wait_for(status, process, "ready ")
        expected = (newest or 0) + 1
        if ready is None or int(ready.split()[1]) != expected:
            self.tally.failures.append(f"{run}: resume gave {ready!r}, expected step {expected}")
        if steer:
            self.wait_for(status, process, "P ")
            time.sleep(self.rng.uniform(0, 0.02))
        else:
            share = max(left / self.args.steps / 3, 2 * self.args.every / self.args.steps)
            time.sleep(self.rng.uniform(0, self.run_seconds * share))
        if not process.is_alive():
            process.join()
            self.say(f"{run.name}: finished before the kill ({'steered' if steer else 'timed'})")
            return False, newest
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        lines = read_status(status)
        inside = inside_write(lines)
        self.tally.kills += 1
        self.tally.steered += steer
        self.tally.kills_in_write += inside
        self.allowance = excess_allowed(lines, self.allowance)
        newest = check_run(run, last_committed(lines), self.tally, self.allowance)
        where = [line for line in lines if line[:1] in "BEP"][-1:] or ["before any write"]
        self.say(
            f"{run.name}: kill {self.tally.kills} ({'steered' if steer else 'timed'}) "
            f"{'inside' if inside else 'outside'} a write, at {where[0]!r}; newest step {newest}"
        )
        return True, newest

    def finish(self, run: Path, reference: Any) -> None:
        import ckptstore

        process, status = self.start(run, None)
        process.join(300)
        if process.exitcode != 0 or "done" not in read_status(status):
            self.tally.failures.append(f"{run}: the last incarnation failed ({process.exitcode})")
            return
        check_run(run, None, self.tally, allowance=0)  # closed cleanly: the policy holds
        final = ckptstore.load(run / f"step-{self.args.steps:09d}")
        if same_bits(final, reference):
            self.tally.final_states_equal += 1
        else:
            self.tally.failures.append(f"{run}: final state differs from the uninterrupted run")
        self.tally.runs_completed += 1

    def go(self) -> Tally:
        began = time.monotonic()
        reference = self.reference()
        run_number = 0
        while self.tally.kills < self.args.kills and len(self.tally.failures) < 20:
            run_number += 1
            run = self.root / f"run-{run_number}"
            newest: int | None = None
            self.allowance = 1
            while self.tally.kills < self.args.kills:
                killed, newest = self.one_kill(run, newest)
                if not killed:
                    break
            self.finish(run, reference)
            if not self.args.keep:
                shutil.rmtree(run, ignore_errors=True)
            for status in self.root.glob("status-*.txt"):
                status.unlink()
        self.tally.restarts = self.incarnations - 1
        self.tally.seconds = round(time.monotonic() - began, 1)
        return self.tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--every", type=int, default=5, help="save every N steps")
    parser.add_argument("--dir", type=Path, default=None, help="where runs go (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per kill")
    args = parser.parse_args(argv)
    if args.steps % args.every:
        parser.error("--steps must be a multiple of --every (the last step is saved)")

    mp.set_forkserver_preload(["__main__", "torch", "ckptstore"])
    root = Path(tempfile.mkdtemp(prefix="kill-campaign-", dir=args.dir))
    try:
        tally = Campaign(args, root).go()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    share = tally.kills_in_write / tally.kills if tally.kills else 0.0
    print(
        f"kills {tally.kills} (inside a write: {tally.kills_in_write}, {share:.0%}; steered "
        f"{tally.steered}), runs completed {tally.runs_completed}, restarts {tally.restarts}, "
        f"checkpoints verified {tally.checkpoints_verified}, final states equal "
        f"{tally.final_states_equal}/{tally.runs_completed}, failures {len(tally.failures)}, "
        f"{tally.seconds}s"
    )
    for failure in tally.failures:
        print("FAIL", failure)
    print(json.dumps(asdict(tally)))
    ok = not tally.failures and tally.runs_completed > 0
    return 0 if ok and tally.final_states_equal == tally.runs_completed else 1


if __name__ == "__main__":
    sys.exit(main())
