"""The durability proof: every state a crash can leave behind is a sound run directory.

A save followed by retention runs through `RecordingStorage`, which records each
effect. For every prefix of those effects, and every subset of at most K of the
not-yet-durable ones lost (plus random larger subsets), the crash state is rebuilt in
a fresh directory (`ckptstore._faults.replay`) and opened with a fresh manager. The
model and its limits are in `ckptstore/_faults.py` and `docs/crash-safety.md`.

What must hold in every state:

1. no partial checkpoint is visible: every directory a scan sees is a sound checkpoint
   that deep-verifies and holds exactly the state saved under its step;
2. no committed checkpoint is lost, unless retention retired it after a later
   checkpoint's commit had returned (was durable);
3. the newest checkpoint loads through a fresh manager (which also removes the crash's
   leftovers), and `latest`/`best`, where present, name a checkpoint that is there;
4. manifest last: any directory, temporary ones included, whose manifest parses never
   holds payload bytes that contradict it (missing is fine, torn is not).

The mutants at the end (no directory fsync; manifest before payload) must be caught.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptstore import CheckpointManager, _commit, _writer
from ckptstore._commit import CommitResult, SaveRequest, discard, temp_name, write_durable
from ckptstore._faults import CrashState, Op, RecordingStorage, crash_states, durable_at, replay
from ckptstore._format import write_payload
from ckptstore._manifest import MANIFEST_NAME, encode_manifest
from ckptstore._read import read_manifest
from ckptstore._rundir import scan
from ckptstore._storage import LocalStorage
from ckptstore._verify import verify_checkpoint
from ckptstore._workers import WorkerPool
from ckptstore.errors import CkptError

K = 3  # every subset of up to K lost ops, exhaustively
SAMPLES = 4  # random larger subsets per prefix, beyond K
POLICY: dict[str, Any] = {"keep_last": 2, "keep_best": 1, "metric": "loss", "mode": "min"}
# Steps already on disk before the recording, then the saves that are recorded: step 4
# makes retention retire step 2; step 5 becomes the best and retires steps 1 and 3.
BEFORE = {1: 0.5, 2: 0.9, 3: 0.8}
RECORDED = {4: 0.7, 5: 0.2}


def state_of(step: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(8, 8, generator=gen), "b": torch.arange(step + 3), "step": step}


def same_state(a: Any, b: Any) -> bool:
    return (
        a["step"] == b["step"]
        and torch.equal(a["w"].view(torch.uint8), b["w"].view(torch.uint8))
        and torch.equal(a["b"], b["b"])
    )


def quiet_manager(path: Path, **kwargs: Any) -> CheckpointManager:
    return CheckpointManager(path, codec=kwargs.pop("codec", "zstd"), threads=1, **POLICY, **kwargs)


def record_saves(
    base: Path, codec: str, commit_fn: Callable[[SaveRequest, WorkerPool], CommitResult]
) -> tuple[Path, list[Op]]:
    """Build the starting tree, then record the saves of RECORDED; return both."""
    start = base / "start"
    with quiet_manager(start, codec=codec) as manager:
        for step, loss in BEFORE.items():
            manager.save(step, state_of(step), metrics={"loss": loss})
    live = base / "live"
    shutil.copytree(start, live, symlinks=True)
    recorder = RecordingStorage(LocalStorage(live))

    def recorded_commit(request: SaveRequest, pool: WorkerPool) -> CommitResult:
        result = commit_fn(request, pool)
        recorder.mark(f"committed {result.name}")  # commit() returned: the promise is made
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_writer, "commit", recorded_commit)
        with quiet_manager(live, codec=codec, storage=recorder) as manager:
            for step, loss in RECORDED.items():
                manager.save(step, state_of(step), metrics={"loss": loss})
                manager.wait()
    return start, recorder.ops


def _step_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def required_names(ops: list[Op], prefix: int, initial: set[str]) -> set[str]:
    """Checkpoints that must be present: the initial ones and every committed one,
    minus those retention retired after a later checkpoint's commit had returned."""
    names = set(initial)
    committed_at: dict[str, int] = {}
    for op in ops[:prefix]:
        if op.kind == "mark" and op.path.startswith("committed "):
            name = op.path.removeprefix("committed ")
            names.add(name)
            committed_at[name] = op.index
        elif op.kind == "rename" and op.other and op.other.startswith(_commit.TRASH_PREFIX):
            newer = [n for n, i in committed_at.items() if i < op.index and n > op.path]
            if newer:
                names.discard(op.path)
    return names


def check_state(root: Path, ops: list[Op], state: CrashState, initial: set[str]) -> str | None:
    """The first broken invariant of this crash state, or None."""
    storage = LocalStorage(root)
    for name in storage.listdir("."):  # 4: manifest last, before the manager cleans up
        if storage.kind(name) != "dir" or storage.kind(f"{name}/{MANIFEST_NAME}") != "file":
            continue
        with contextlib.suppress(CkptError, OSError):
            read_manifest(storage, name)
            report = verify_checkpoint(storage, name, deep=True)
            if report.status == "corrupt":
                return f"{name} has a manifest but torn payload: {report.problems[0].reason}"

    found = scan(storage)  # 1: nothing partial is visible
    if found.broken or found.foreign:
        return f"partial or broken entries visible: {found.broken or found.foreign}"
    for info in found.checkpoints.values():
        report = verify_checkpoint(storage, info.name, deep=True)
        if not report.sound:
            return f"{info.name} is visible but not sound: {report.problems}"

    present = {info.name for info in found.checkpoints.values()}
    missing = required_names(ops, state.prefix, initial) - present  # 2
    if missing:
        return f"committed checkpoints lost: {sorted(missing)}"

    for pointer in ("latest", "best"):
        target = os.readlink(root / pointer) if (root / pointer).is_symlink() else None
        if target is not None and target not in present:
            return f"{pointer} -> {target}, which is not a checkpoint"
    with CheckpointManager(root, read_only=True) as reader:
        for step in found.checkpoints:
            if not same_state(reader.load(step), state_of(step)):
                return f"step {step} holds another state"

    with quiet_manager(root) as manager:  # 3: a fresh writer resumes (and tidies up)
        newest = max(found.checkpoints, default=None)
        loaded = manager.load()
        if newest is None:
            return None if loaded is None else "loaded a state from an empty run"
        if loaded is None or not same_state(loaded, state_of(newest)):
            return f"load() did not return the state of step {newest}"
    leftovers = [n for n in os.listdir(root) if n.startswith((".tmp-", ".trash-"))]
    return f"leftovers not removed: {leftovers}" if leftovers else None


def violations(
    base: Path, start: Path, ops: list[Op], stop_at_first: bool
) -> Iterator[tuple[CrashState, str]]:
    initial = {n for n in os.listdir(start) if n.startswith("step-")}
    work = base / "state"
    for state in crash_states(ops, K, SAMPLES, seed=8):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(start, work, symlinks=True)
        replay(ops, state, str(work))
        problem = check_state(work, ops, state, initial)
        if problem is not None:
            yield state, problem
            if stop_at_first:
                return


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="ckptstore")  # crash states warn by design


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_every_crash_state_of_save_and_retention_is_sound(tmp_path: Path, codec: str) -> None:
    start, ops = record_saves(tmp_path, codec, _commit.commit)
    kinds = [op.kind for op in ops]
    assert kinds.count("mark") == len(RECORDED)
    assert kinds.count("remove_tree") == 3  # retention retired steps 2, 1 and 3

    count = sum(1 for _ in crash_states(ops, K, SAMPLES, seed=8))
    problems = []
    for state, problem in violations(tmp_path, start, ops, stop_at_first=False):
        problems.append(f"{state.describe(ops)}: {problem}")
    assert not problems, "\n".join(problems[:10])
    assert count > 100  # the enumeration really explores (figure in docs/crash-safety.md)


def test_model_makes_entries_durable_only_by_their_directory_fsync() -> None:
    ops = [
        Op(0, "mkdir", ".tmp-a"),
        Op(1, "create", ".tmp-a/f", file=0),
        Op(2, "write", ".tmp-a/f", data=b"x", file=0),
        Op(3, "fsync", ".tmp-a/f", file=0),
        Op(4, "fsync_dir", ".tmp-a"),
        Op(5, "rename", ".tmp-a", other="a"),
        Op(6, "fsync_dir", "a"),  # the same directory under its new name: nothing new
        Op(7, "fsync_dir", "."),
    ]
    assert durable_at(ops) == [7, 4, 3, 3, 4, 7, 6, 7]
    states = list(crash_states(ops, k=8))
    assert CrashState(6, frozenset({0, 5})) in states
    assert all(not state.lost for state in states if state.prefix == 8)


# --- mutants: the checker must catch a broken protocol -----------------------------------


def _commit_without_dir_fsync(request: SaveRequest, pool: WorkerPool) -> CommitResult:
    """The real protocol minus step 4: the temporary directory is never fsynced."""
    storage = request.storage
    original = storage.fsync_dir

    def skip_tmp(path: str) -> None:
        if not path.startswith(_commit.TMP_PREFIX):
            original(path)

    storage.fsync_dir = skip_tmp  # type: ignore[method-assign]
    try:
        return _commit.commit(request, pool)
    finally:
        storage.fsync_dir = original  # type: ignore[method-assign]


class _Buffer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += memoryview(data).cast("B")

    def fsync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _commit_manifest_first(request: SaveRequest, pool: WorkerPool) -> CommitResult:
    """Everything as the real protocol, except the manifest is written before the payload."""
    storage, name, tmp = request.storage, request.name, temp_name(request.name)
    storage.mkdir(tmp)
    try:
        request.snapshot.wait_ready()
        payload = _Buffer()
        record, sums = write_payload(payload, request.snapshot, request.codec, pool)
        body = _commit._manifest_body(request, record, sums)
        write_durable(storage, f"{tmp}/{MANIFEST_NAME}", encode_manifest(body))
        write_durable(storage, f"{tmp}/{request.codec.file_name}", bytes(payload.data))
        storage.fsync_dir(tmp)
        storage.rename(tmp, name)
    except BaseException:
        discard(storage, tmp)
        raise
    storage.fsync_dir(".")
    return CommitResult(name, storage.describe(name), request.step, 0, 0, 0.0)


@pytest.mark.parametrize(
    "mutant",
    [_commit_without_dir_fsync, _commit_manifest_first],
    ids=["no-dir-fsync", "manifest-first"],
)
def test_checker_catches_broken_commit_protocols(tmp_path: Path, mutant: Any) -> None:
    start, ops = record_saves(tmp_path, "zstd", mutant)
    found = next(violations(tmp_path, start, ops, stop_at_first=True), None)
    assert found is not None, f"the crash-state checker missed the {mutant.__name__} mutant"
