"""Offline retention: apply the manager's rules to a run directory nobody is writing.

`plan_gc` decides with exactly the manager's rules (`build_policy` and
`_retention.victims`): candidates are the sound checkpoints; the newest checkpoint,
the best by the metric and the latest are never deleted; unsound checkpoints are
never touched by retention. One rule is added, because gc runs without the trainer's
configuration: a checkpoint that the `best` or `latest` pointer names is kept too, so
a gc run with another metric never leaves a pointer dangling.

`collect` takes the writer lock (a live trainer holds it, and then gc refuses),
rescans under it, removes crash leftovers as the manager does when it opens, and
retires each victim crash-safely: rename to `.trash-*`, fsync the directory, delete.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from ._commit import TRASH_PREFIX, discard
from ._lock import WriterLock
from ._manager import build_policy
from ._pointers import POINTERS, DanglingPointerError, read_pointer
from ._retention import Candidate, KeepBest, KeepEvery, KeepLast, Mode, best_step, victims
from ._rundir import RunScan, scan
from ._storage import LocalStorage, Storage
from .errors import CheckpointNotFoundError


@dataclass(frozen=True)
class Decision:
    name: str
    step: int
    reasons: tuple[str, ...]  # why it is kept, or why it goes

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "step": self.step, "reasons": list(self.reasons)}


@dataclass
class GcPlan:
    directory: str
    dry_run: bool
    delete: list[Decision] = field(default_factory=list)
    keep: list[Decision] = field(default_factory=list)
    untouched: dict[str, str] = field(default_factory=dict)  # name -> why retention skips it
    leftovers: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.directory,
            "dry_run": self.dry_run,
            "delete": [d.as_dict() for d in self.delete],
            "keep": [d.as_dict() for d in self.keep],
            "untouched": [{"name": n, "reason": r} for n, r in sorted(self.untouched.items())],
            "leftovers": list(self.leftovers),
        }


@dataclass(frozen=True)
class Rules:
    keep_last: int
    keep_best: int | None = None
    keep_every: int | None = None
    metric: str | None = None
    mode: Mode = "min"


def _pointer_steps(storage: Storage, found: RunScan) -> dict[int, list[str]]:
    steps = {c.name: s for s, c in found.checkpoints.items()}
    named: dict[int, list[str]] = {}
    for pointer in POINTERS:
        try:
            target = read_pointer(storage, pointer)
        except (DanglingPointerError, OSError):
            continue
        if target in steps:
            named.setdefault(steps[target], []).append(pointer)
    return named


def _reasons(step: int, candidates: list[Candidate], rules: Rules) -> list[str]:
    """Why each of the manager's policies keeps `step` (empty: none does)."""
    why = []
    if step in KeepLast(rules.keep_last).keep(candidates):
        why.append(f"among the last {rules.keep_last}")
    if (
        rules.keep_best
        and rules.metric
        and step in KeepBest(rules.keep_best, rules.metric, rules.mode).keep(candidates)
    ):
        why.append(f"among the best {rules.keep_best} by {rules.metric} ({rules.mode})")
    if rules.keep_every and step in KeepEvery(rules.keep_every).keep(candidates):
        why.append(f"a multiple of {rules.keep_every}")
    return why


def _against(rules: Rules) -> list[str]:
    why = [f"not among the last {rules.keep_last}"]
    if rules.keep_best and rules.metric:
        why.append(f"not among the best {rules.keep_best} by {rules.metric} ({rules.mode})")
    if rules.keep_every:
        why.append(f"not a multiple of {rules.keep_every}")
    return why


def plan_gc(storage: Storage, rules: Rules, dry_run: bool = True) -> GcPlan:
    policy = build_policy(
        rules.keep_last, rules.keep_best, rules.keep_every, rules.metric, rules.mode
    )
    found = scan(storage)
    plan = GcPlan(storage.describe("."), dry_run, leftovers=sorted(found.leftovers))
    plan.untouched = {
        c.name: f"unsound: {c.problem}" for c in found.checkpoints.values() if not c.sound
    }
    plan.untouched.update({n: f"not a usable checkpoint: {w}" for n, w in found.broken.items()})
    candidates = [Candidate(c.step, c.metrics) for c in found.checkpoints.values() if c.sound]
    if not candidates:
        return plan
    pointed = _pointer_steps(storage, found)
    newest = max(c.step for c in candidates)
    best = best_step(candidates, rules.metric, rules.mode)
    doomed = set(victims(candidates, policy, [newest, best, *pointed]))
    for candidate in sorted(candidates, key=lambda c: c.step):
        step = candidate.step
        name = found.checkpoints[step].name
        if step in doomed:
            plan.delete.append(Decision(name, step, tuple(_against(rules))))
            continue
        why = _reasons(step, candidates, rules)
        if step == newest:
            why.append("the newest checkpoint")
        if step == best:
            why.append(f"the best by {rules.metric}")
        why += [f"the {p} pointer names it" for p in pointed.get(step, [])]
        plan.keep.append(Decision(name, step, tuple(why)))
    return plan


def _retire(storage: Storage, name: str) -> None:
    trash = f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
    storage.rename(name, trash)
    storage.fsync_dir(".")
    discard(storage, trash)


def collect(directory: str | os.PathLike[str], rules: Rules, dry_run: bool = False) -> GcPlan:
    """Plan retention for `directory` and, unless `dry_run`, carry it out under the lock.

    Raises LockedError when a writer holds the run, CheckpointNotFoundError when
    `directory` is not a directory, ValueError for rules the manager would refuse.
    """
    path = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"no run directory at {path}")
    storage = LocalStorage(path)
    if dry_run:
        return plan_gc(storage, rules, dry_run=True)
    lock = WriterLock(path)
    lock.acquire()
    try:
        plan = plan_gc(storage, rules, dry_run=False)
        for name in plan.leftovers:
            if storage.kind(name) == "dir":
                discard(storage, name)
            else:
                storage.remove_file(name)
        for decision in plan.delete:
            _retire(storage, decision.name)
        return plan
    finally:
        lock.release()
