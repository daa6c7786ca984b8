"""Verify a whole run directory: every checkpoint, the pointers, and what else lies there.

`verify_run` is what `ckptstore verify DIR` reports. Each checkpoint is checked by
`verify_checkpoint` (quick or deep); the run adds what only the directory can say:

- a pointer (`best`, `latest`) that names nothing, or something that is not a
  checkpoint, is a problem (status "incomplete": the thing it names is missing);
  a pointer to a checkpoint that is itself unsound is reported on the pointer, and
  the checkpoint's own report carries the problem;
- two checkpoints that record the same step are a problem ("corrupt": the directory
  contradicts itself; the manager uses the one `scan` prefers);
- leftovers (`.tmp-*`, `.trash-*`) and foreign entries are listed, never an error:
  a crash leaves leftovers by design and the next writer removes them;
- a directory holding payload files but no manifest is reported as an incomplete
  checkpoint rather than as foreign, since that is what a lost manifest looks like.

A checkpoint that disappears while it is being verified (retention of a live writer
retired it) is dropped from the report, not counted as missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ._format import COMPRESSED_FILE, PLAIN_FILE
from ._manifest import MANIFEST_NAME
from ._pointers import POINTERS, DanglingPointerError, read_pointer
from ._rundir import RunScan, scan
from ._storage import LocalStorage, Storage
from ._verify import CheckpointReport, Problem, Status, verify_checkpoint
from .errors import CheckpointNotFoundError

PointerStatus = Literal["ok", "absent", "dangling", "stale", "unsound"]
Progress = Callable[[int, int, str], None]  # (index, total, checkpoint name)
_SEVERITY = {"sound": 0, "incomplete": 1, "corrupt": 2}


@dataclass
class PointerReport:
    name: str
    status: PointerStatus
    target: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "target": self.target,
            "reason": self.reason,
        }


@dataclass
class RunReport:
    path: str
    deep: bool = False
    checkpoints: list[CheckpointReport] = field(default_factory=list)
    pointers: list[PointerReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # run-level ones
    leftovers: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    scan: RunScan | None = field(default=None, repr=False)

    @property
    def status(self) -> Status:
        statuses: list[Status] = [c.status for c in self.checkpoints]
        statuses += [p.status for p in self.problems]
        return max(statuses, key=_SEVERITY.__getitem__, default="sound")

    @property
    def sound(self) -> bool:
        return self.status == "sound"

    @property
    def bytes_checked(self) -> int:
        return sum(c.bytes_checked for c in self.checkpoints)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "run",
            "path": self.path,
            "status": self.status,
            "deep": self.deep,
            "bytes_checked": self.bytes_checked,
            "checkpoints": [c.as_dict() for c in self.checkpoints],
            "pointers": [p.as_dict() for p in self.pointers],
            "problems": [p.__dict__.copy() for p in self.problems],
            "leftovers": list(self.leftovers),
            "foreign": list(self.foreign),
        }


def looks_like_checkpoint(storage: Storage, name: str) -> bool:
    """A directory with a manifest or a payload file: ours, whatever its state."""
    return storage.kind(name) == "dir" and any(
        storage.kind(f"{name}/{file}") is not None
        for file in (MANIFEST_NAME, PLAIN_FILE, COMPRESSED_FILE)
    )


def _to_check(found: RunScan, storage: Storage) -> tuple[list[str], list[str]]:
    """Names to verify (by step, then the unreadable ones by name), and the foreign rest."""
    names = [found.checkpoints[s].name for s in sorted(found.checkpoints)]
    unreadable = set(found.broken)
    foreign = []
    for name in found.foreign:
        if looks_like_checkpoint(storage, name):
            unreadable.add(name)
        else:
            foreign.append(name)
    return names + sorted(unreadable - set(names)), foreign


def _check_pointer(
    storage: Storage, pointer: str, reports: dict[str, CheckpointReport]
) -> PointerReport:
    try:
        target = read_pointer(storage, pointer)
    except (DanglingPointerError, OSError) as error:
        return PointerReport(pointer, "dangling", None, str(error))
    if target is None:
        return PointerReport(pointer, "absent")
    report = reports.get(target)
    if report is None:
        kind = storage.kind(target)
        why = "which does not exist" if kind is None else "which is not a checkpoint"
        return PointerReport(pointer, "dangling", target, f"{pointer} points to {target!r}, {why}")
    if not report.sound:
        return PointerReport(pointer, "unsound", target, f"{target} is {report.status}")
    return PointerReport(pointer, "ok", target)


def _duplicate_steps(reports: list[CheckpointReport]) -> list[Problem]:
    by_step: dict[int, list[str]] = {}
    for checked in reports:
        if checked.step is not None:
            by_step.setdefault(checked.step, []).append(os.path.basename(checked.path))
    return [
        Problem("corrupt", f"checkpoints {', '.join(names)} all record step {step}")
        for step, names in sorted(by_step.items())
        if len(names) > 1
    ]


def verify_storage(
    storage: Storage, deep: bool = False, progress: Progress | None = None
) -> RunReport:
    """Verify the run directory at the root of `storage`."""
    found = scan(storage)
    report = RunReport(storage.describe("."), deep, scan=found)
    report.leftovers = sorted(found.leftovers)
    names, report.foreign = _to_check(found, storage)
    by_name: dict[str, CheckpointReport] = {}
    for index, name in enumerate(names):
        if progress is not None:
            progress(index, len(names), name)
        checked = verify_checkpoint(storage, name, deep)
        if not checked.sound and storage.kind(name) is None:
            continue  # retired by a live writer while we looked
        by_name[name] = checked
        report.checkpoints.append(checked)
    if progress is not None:
        progress(len(names), len(names), "")
    report.problems += _duplicate_steps(report.checkpoints)
    report.pointers = [_check_pointer(storage, p, by_name) for p in POINTERS]
    _check_latest_is_newest(report, by_name)
    for pointer in report.pointers:
        if pointer.status in ("dangling", "stale"):
            report.problems.append(Problem("incomplete", str(pointer.reason), file=pointer.name))
    return report


def _check_latest_is_newest(report: RunReport, by_name: dict[str, CheckpointReport]) -> None:
    """`latest` must name the newest sound checkpoint; a kill between a commit and the
    pointer move leaves it on an older one until the next writer opens."""
    sound = [c for c in by_name.values() if c.sound and c.step is not None]
    if not sound:
        return
    newest = max(sound, key=lambda c: c.step or 0)
    for i, pointer in enumerate(report.pointers):
        target = by_name.get(pointer.target or "")
        if pointer.name == "latest" and pointer.status == "ok" and target is not newest:
            report.pointers[i] = PointerReport(
                "latest",
                "stale",
                pointer.target,
                f"latest points to {pointer.target} (step {target.step if target else '?'}), "
                f"but the newest sound checkpoint is {os.path.basename(newest.path)} "
                f"(step {newest.step}); the next writer to open the run moves it",
            )


def resolve_checkpoint(path: str | os.PathLike[str]) -> tuple[LocalStorage, str]:
    """The storage (parent directory) and name of `path`; a pointer gives its target.

    Raises DanglingPointerError when `path` is a pointer that names nothing usable.
    """
    full = os.path.abspath(os.fspath(path))
    storage, name = LocalStorage(os.path.dirname(full)), os.path.basename(full)
    if name in POINTERS and storage.kind(name) in ("link", "file"):
        target = read_pointer(storage, name)
        if target is not None:
            name = target
    return storage, name


def verify_run(
    directory: str | os.PathLike[str], deep: bool = False, progress: Progress | None = None
) -> RunReport:
    """Verify every checkpoint, pointer and leftover of a run directory, from its files alone.

    `progress(index, total, name)` is called before each checkpoint and once at the end.
    Raises CheckpointNotFoundError when `directory` is not a directory.
    """
    path = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"no run directory at {path}")
    return verify_storage(LocalStorage(path), deep, progress)
