"""What a run directory holds, read from the files alone.

`scan` sorts every name in a run directory into: checkpoints (a directory with a
readable manifest that records a step; ordered by that step, never by the name),
leftovers (`.tmp-*` and `.trash-*`, which only ckptstore creates), the pointers and
lock files, and foreign entries (everything else: a user's notes, a hand-made
directory, a directory without a manifest). Foreign entries are reported and never
touched. A checkpoint is *sound* at this level when its manifest parses and checks
and every payload file has its recorded size; `load` and `verify --deep` check the
bytes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._commit import TMP_PREFIX, TRASH_PREFIX
from ._lock import LOCK_NAME, OWNER_NAME
from ._manifest import Manifest
from ._pointers import POINTERS
from ._read import read_manifest
from ._storage import Storage
from .errors import CkptError, IncompleteCheckpointError


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    step: int
    created: str
    metrics: dict[str, float]
    raw_bytes: int
    stored_bytes: int
    problem: str | None = None  # None when sound

    @property
    def sound(self) -> bool:
        return self.problem is None


@dataclass
class RunScan:
    checkpoints: dict[int, CheckpointInfo] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # name -> why (unreadable manifest)

    def sound_steps(self) -> list[int]:
        return sorted(s for s, c in self.checkpoints.items() if c.sound)


def quick_problem(storage: Storage, name: str, manifest: Manifest) -> str | None:
    """Why the checkpoint is not sound by its file sizes, or None."""
    for file in manifest.files.values():
        path = f"{name}/{file.name}"
        kind = storage.kind(path)
        if kind != "file":
            return (
                f"payload file {file.name} is missing"
                if kind is None
                else (f"payload {file.name} is a {kind}, not a file")
            )
        size = storage.size(path)
        if size != file.size:
            return f"payload file {file.name} is {size} bytes, the manifest records {file.size}"
    return None


def info_from(storage: Storage, name: str, manifest: Manifest) -> CheckpointInfo:
    assert manifest.step is not None
    return CheckpointInfo(
        name,
        manifest.step,
        manifest.created,
        dict(manifest.metrics),
        manifest.raw_size,
        manifest.stored_size,
        quick_problem(storage, name, manifest),
    )


def scan(storage: Storage) -> RunScan:
    result = RunScan()
    for name in storage.listdir("."):
        if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            result.leftovers.append(name)
            continue
        if name in POINTERS or name in (LOCK_NAME, OWNER_NAME):
            continue
        if storage.kind(name) != "dir":
            result.foreign.append(name)
            continue
        try:
            manifest = read_manifest(storage, name)
        except IncompleteCheckpointError:
            result.foreign.append(name)  # a directory without a manifest is not ours
            continue
        except (CkptError, OSError) as error:
            result.broken[name] = str(error)
            continue
        if manifest.step is None:
            result.foreign.append(name)
            continue
        info = info_from(storage, name, manifest)
        other = result.checkpoints.get(info.step)
        if other is not None:
            # Two directories claim one step: keep the sound, then the newer, one.
            keep = max((other, info), key=lambda c: (c.sound, c.created, c.name))
            drop = info if keep is other else other
            result.broken[drop.name] = f"a second checkpoint of step {info.step} ({keep.name})"
            info = keep
        result.checkpoints[info.step] = info
    return result
