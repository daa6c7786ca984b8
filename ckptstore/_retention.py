"""Retention: which checkpoints to keep. Small, pure policies, testable without a disk.

A policy looks at the sound checkpoints of a run (oldest first) and returns the steps
it wants kept; the manager keeps the union of what its policies want plus what must
never go (the newest checkpoint, the one just written, the pointer targets), and
deletes the rest. Nothing is deleted unless `keep_last` is set: a run without it
keeps every checkpoint.

Best: a checkpoint is a candidate when its metric is present and finite. Among
candidates the lowest (mode "min") or highest (mode "max") value wins; on a tie the
earlier step wins, so a later checkpoint must strictly improve to become the best.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Mode = Literal["min", "max"]


@dataclass(frozen=True)
class Candidate:
    step: int
    metrics: dict[str, float]


class Policy(Protocol):
    def keep(self, checkpoints: Sequence[Candidate]) -> set[int]: ...


def _positive(name: str, value: int) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be a positive int or None, not {value!r}")
    return value


@dataclass(frozen=True)
class KeepLast:
    n: int

    def __post_init__(self) -> None:
        _positive("keep_last", self.n)

    def keep(self, checkpoints: Sequence[Candidate]) -> set[int]:
        return {c.step for c in sorted(checkpoints, key=lambda c: c.step)[-self.n :]}


@dataclass(frozen=True)
class KeepEvery:
    n: int

    def __post_init__(self) -> None:
        _positive("keep_every", self.n)

    def keep(self, checkpoints: Sequence[Candidate]) -> set[int]:
        return {c.step for c in checkpoints if c.step % self.n == 0}


def qualifies(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def ranked(checkpoints: Iterable[Candidate], metric: str, mode: Mode) -> list[Candidate]:
    """Candidates for best, best first; ties go to the earlier step."""
    sign = 1.0 if mode == "min" else -1.0
    usable = [c for c in checkpoints if qualifies(c.metrics.get(metric))]
    return sorted(usable, key=lambda c: (sign * c.metrics[metric], c.step))


def best_step(checkpoints: Iterable[Candidate], metric: str | None, mode: Mode) -> int | None:
    if metric is None:
        return None
    order = ranked(checkpoints, metric, mode)
    return order[0].step if order else None


@dataclass(frozen=True)
class KeepBest:
    k: int
    metric: str
    mode: Mode = "min"

    def __post_init__(self) -> None:
        _positive("keep_best", self.k)
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {self.mode!r}")

    def keep(self, checkpoints: Sequence[Candidate]) -> set[int]:
        return {c.step for c in ranked(checkpoints, self.metric, self.mode)[: self.k]}


@dataclass(frozen=True)
class AnyOf:
    policies: tuple[Policy, ...]

    def keep(self, checkpoints: Sequence[Candidate]) -> set[int]:
        kept: set[int] = set()
        for policy in self.policies:
            kept |= policy.keep(checkpoints)
        return kept


def victims(
    checkpoints: Sequence[Candidate], policy: Policy | None, protected: Iterable[int | None]
) -> list[int]:
    """Steps to delete, oldest first. `policy` None keeps everything."""
    if policy is None or not checkpoints:
        return []
    keep = policy.keep(checkpoints) | {s for s in protected if s is not None}
    keep.add(max(c.step for c in checkpoints))
    return sorted(c.step for c in checkpoints if c.step not in keep)
