"""CheckpointManager as a state machine: saves, rollbacks, reopens, crashes, loads.

The model below keeps its own account of which checkpoints exist and recomputes
retention and the best checkpoint from the rules in issue 4 (keep the last N, the K
best with a finite metric, every N-th step, the best, the newest; ties go to the
earlier step), independently of ckptstore's code. A crash is a storage that stops
dead at its N-th mutating operation: everything after it, including the clean-up a
live process would do, raises, as if the process had been killed there.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ckptstore import CheckpointManager
from ckptstore._storage import LocalStorage

MANIFEST = "manifest.json"
METRIC = "loss"

metrics = st.one_of(
    st.none(),  # no metric at all
    st.sampled_from([0.1, 0.2, 0.3]),  # ties
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.floats(-5, 5, allow_nan=False, allow_infinity=False),
)


class SimulatedCrash(BaseException):
    """The process died here. A BaseException so that no `except Exception` survives it."""


class CrashingStorage(LocalStorage):
    """A local storage that dies at its N-th mutating operation, once armed."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self._mutex = threading.Lock()
        self._left: int | None = None
        self.dead = False
        self.done: list[tuple[str, ...]] = []  # mutations that happened, in order

    def arm(self, operations: int) -> None:
        self._left = operations

    def _step(self, *op: str) -> None:
        with self._mutex:
            if self.dead:
                raise SimulatedCrash(op)
            if self._left is not None:
                if self._left == 0:
                    self.dead = True
                    raise SimulatedCrash(op)
                self._left -= 1
            self.done.append(op)

    def _alive(self) -> None:
        if self.dead:
            raise SimulatedCrash("read after death")

    # Mutations: each one is a point where the crash can cut.
    def mkdir(self, path: str) -> None:
        self._step("mkdir", path)
        super().mkdir(path)

    def create(self, path: str) -> Any:
        self._step("create", path)
        return CrashingHandle(self, super().create(path), path)

    def fsync_dir(self, path: str) -> None:
        self._step("fsync_dir", path)
        super().fsync_dir(path)

    def rename(self, src: str, dst: str) -> None:
        self._step("rename", src, dst)
        super().rename(src, dst)

    def remove_file(self, path: str) -> None:
        self._step("remove_file", path)
        super().remove_file(path)

    def remove_tree(self, path: str) -> None:
        self._step("remove_tree", path)
        super().remove_tree(path)

    def symlink(self, target: str, path: str) -> None:
        self._step("symlink", target, path)
        super().symlink(target, path)

    # Reads: harmless, but a dead process makes none.
    def kind(self, path: str) -> Any:
        self._alive()
        return super().kind(path)

    def read_bytes(self, path: str, limit: int) -> bytes:
        self._alive()
        return super().read_bytes(path, limit)

    def listdir(self, path: str) -> list[str]:
        self._alive()
        return super().listdir(path)


class CrashingHandle:
    def __init__(self, storage: CrashingStorage, inner: Any, path: str) -> None:
        self._storage, self._inner, self._path = storage, inner, path

    def write(self, data: Any) -> None:
        self._storage._step("write", self._path)
        self._inner.write(data)

    def fsync(self) -> None:
        self._storage._step("fsync", self._path)
        self._inner.fsync()

    def close(self) -> None:
        self._inner.close()  # the kernel closes a dead process's files too


@dataclass(frozen=True)
class Config:
    keep_last: int | None
    keep_best: int | None
    keep_every: int | None
    mode: str

    def manager(self, run: Path, **extra: Any) -> CheckpointManager:
        return CheckpointManager(
            run,
            keep_last=self.keep_last,
            keep_best=self.keep_best,
            keep_every=self.keep_every,
            metric=METRIC,
            mode=self.mode,  # type: ignore[arg-type]
            threads=1,
            **extra,
        )


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def ranked(present: dict[int, float | None], mode: str) -> list[int]:
    """Steps with a finite metric, best first; a tie goes to the earlier step."""
    usable = [(s, v) for s, v in present.items() if finite(v)]
    sign = 1.0 if mode == "min" else -1.0
    order = sorted(usable, key=lambda sv: (sign * float(sv[1] or 0.0), sv[0]))
    return [s for s, _ in order]


def true_best(present: dict[int, float | None], mode: str) -> int | None:
    order = ranked(present, mode)
    return order[0] if order else None


def kept_after_commit(
    present: dict[int, float | None], config: Config, new: int | None
) -> set[int]:
    if config.keep_last is None:
        return set(present)
    steps = sorted(present)
    keep = set(steps[-config.keep_last :]) | {new, steps[-1]}
    order = ranked(present, config.mode)
    if order:
        keep.add(order[0])
    if config.keep_best is not None:
        keep |= set(order[: config.keep_best])
    if config.keep_every is not None:
        keep |= {s for s in steps if s % config.keep_every == 0}
    return keep


def name(step: int) -> str:
    return f"step-{step:09d}"


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="ckpt-stateful-"))
        self.run = self.root / "run"
        self.present: dict[int, float | None] = {}
        self.version: dict[int, int] = {}
        self.counter = 0
        self.manager: CheckpointManager | None = None
        self.bounded = True  # false between a crash inside retention and the next commit

    @initialize(
        keep_last=st.sampled_from([None, 1, 2, 3]),
        keep_best=st.sampled_from([None, 1, 2]),
        keep_every=st.sampled_from([None, None, 4]),
        mode=st.sampled_from(["min", "max"]),
    )
    def open(
        self, keep_last: int | None, keep_best: int | None, keep_every: int | None, mode: str
    ) -> None:
        self.config = Config(keep_last, keep_best, keep_every, mode)
        self.manager = self.config.manager(self.run)

    def teardown(self) -> None:
        try:
            if self.manager is not None:
                self.manager.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------
    def next_step(self, gap: int) -> int:
        return max(self.present, default=0) + gap

    def state(self, step: int) -> dict[str, Any]:
        self.counter += 1
        self.version[step] = self.counter
        return {"w": torch.full((3,), float(step)), "step": step, "v": self.counter}

    def check_state(self, loaded: Any, step: int | None) -> None:
        if step is None:
            assert loaded is None
            return
        assert loaded is not None, f"expected step {step}, loaded nothing"
        assert loaded["step"] == step
        assert loaded["v"] == self.version[step]
        assert torch.equal(loaded["w"], torch.full((3,), float(step)))

    def save(self, step: int, metric: float | None, overwrite: bool = False) -> None:
        assert self.manager is not None
        values = {} if metric is None else {METRIC: metric}
        self.manager.save(step, self.state(step), metrics=values, overwrite=overwrite)
        self.manager.wait()

    def commit_in_model(self, step: int, metric: float | None) -> None:
        self.present[step] = metric
        keep = kept_after_commit(self.present, self.config, step)
        self.present = {s: v for s, v in self.present.items() if s in keep}
        self.bounded = True

    def disk(self) -> set[int]:
        found = set()
        for entry in os.listdir(self.run):
            path = self.run / entry
            if entry.startswith(".") or path.is_symlink() or not (path / MANIFEST).is_file():
                continue
            assert entry.startswith("step-"), entry
            found.add(int(entry.removeprefix("step-")))
        return found

    # -- rules ---------------------------------------------------------------------------
    @rule(metric=metrics, gap=st.integers(1, 3))
    def save_next(self, metric: float | None, gap: int) -> None:
        step = self.next_step(gap)
        self.save(step, metric)
        self.commit_in_model(step, metric)

    @precondition(lambda self: bool(self.present))
    @rule(metric=metrics, data=st.data())
    def save_rollback(self, metric: float | None, data: st.DataObject) -> None:
        step = data.draw(st.integers(0, max(self.present)), label="rollback to")
        self.save(step, metric, overwrite=True)
        self.present = {s: v for s, v in self.present.items() if s < step}
        self.commit_in_model(step, metric)

    def close_cleanly(self) -> None:
        """A writer's clean close runs one more retention pass (it restores the bounds
        that a crash inside an earlier pass left exceeded)."""
        assert self.manager is not None
        self.manager.close()
        self.manager = None
        if self.present:
            keep = kept_after_commit(self.present, self.config, None)
            self.present = {s: v for s, v in self.present.items() if s in keep}
        self.bounded = True

    @rule()
    def reopen(self) -> None:
        self.close_cleanly()
        self.manager = self.config.manager(self.run)

    @rule(metric=metrics, gap=st.integers(1, 3), cut=st.integers(0, 24))
    def crash_during_save(self, metric: float | None, gap: int, cut: int) -> None:
        self.close_cleanly()
        step = self.next_step(gap)

        storage = CrashingStorage(self.run)
        crashing = self.config.manager(self.run, storage=storage)
        storage.arm(cut)
        values = {} if metric is None else {METRIC: metric}
        try:
            crashing.save(step, self.state(step), metrics=values)
            crashing.wait()
        except SimulatedCrash:
            pass
        finally:
            with contextlib.suppress(SimulatedCrash):
                crashing.close()
        self.manager = self.config.manager(self.run)  # a fresh process, a fresh writer

        if not storage.dead:  # the cut came after the last operation: a clean save
            self.commit_in_model(step, metric)
            return
        committed = any(op[0] == "rename" and op[2] == name(step) for op in storage.done)
        before = dict(self.present)
        if committed:
            before[step] = metric
        must_keep = kept_after_commit(before, self.config, step) if committed else set(before)
        found = self.disk()
        assert must_keep <= found, f"cut at {cut}: lost {must_keep - found}"
        assert found <= set(before), f"cut at {cut}: appeared {found - set(before)}"
        self.present = {s: before[s] for s in found}
        # A crash inside retention leaves victims that the next commit deletes; a crash
        # before the commit leaves the bounds as they were.
        self.bounded = found == must_keep and (committed or self.bounded)

    @precondition(lambda self: bool(self.present))
    @rule(data=st.data())
    def load_a_step(self, data: st.DataObject) -> None:
        assert self.manager is not None
        step = data.draw(st.sampled_from(sorted(self.present)), label="load step")
        self.check_state(self.manager.load(step=step), step)

    @rule()
    def load_newest(self) -> None:
        assert self.manager is not None
        self.check_state(self.manager.load(), max(self.present, default=None))
        self.check_state(self.manager.load("latest"), max(self.present, default=None))

    @rule()
    def load_best(self) -> None:
        assert self.manager is not None
        self.check_state(self.manager.load("best"), true_best(self.present, self.config.mode))

    # -- invariants ----------------------------------------------------------------------
    @invariant()
    def index_matches_the_disk_and_the_model(self) -> None:
        if self.manager is None:
            return
        assert self.disk() == set(self.present)
        assert self.manager.steps() == sorted(self.present)

    @invariant()
    def latest_is_the_newest_committed(self) -> None:
        if self.manager is None:
            return
        assert self.manager.latest_step == max(self.present, default=None)

    @invariant()
    def best_is_the_true_best(self) -> None:
        if self.manager is None:
            return
        assert self.manager.best_step == true_best(self.present, self.config.mode)

    @invariant()
    def retention_bounds_hold(self) -> None:
        if self.manager is None or self.config.keep_last is None or not self.bounded:
            return
        every = self.config.keep_every
        counted = [s for s in self.present if every is None or s % every]
        assert len(counted) <= self.config.keep_last + max(self.config.keep_best or 0, 1)

    @invariant()
    def every_pointer_resolves_to_its_checkpoint(self) -> None:
        if self.manager is None:
            return
        expected = {
            "latest": max(self.present, default=None),
            "best": true_best(self.present, self.config.mode),
        }
        for which, step in expected.items():
            path = self.run / which
            if path.is_symlink():
                target: str | None = os.readlink(path)
            elif path.is_file():
                target = path.read_text().strip()
            else:
                target = None
            assert target == (None if step is None else name(step)), which
            if target is not None:
                assert (self.run / target / MANIFEST).is_file()

    @invariant()
    def no_leftovers_under_a_live_writer(self) -> None:
        if self.manager is None:
            return
        assert not [n for n in os.listdir(self.run) if n.startswith((".tmp-", ".trash-"))]


TestManagerStateMachine = ManagerMachine.TestCase
TestManagerStateMachine.settings = settings(
    max_examples=50,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
