"""CheckpointManager: a series of checkpoints in one run directory, for a training loop.

The manager owns a run directory: it names checkpoints by step, commits them through
the background writer, moves the `latest` and `best` pointers, applies retention, and
loads the newest sound checkpoint on resume. Its index is rebuilt from the manifests
every time it is opened, so nothing but the checkpoints themselves is trusted.

Order of effects after each commit (in the writer thread): index, pointers, retention.
Retention therefore only ever runs once the new checkpoint is durable, and deletes by
renaming the victim to `.trash-*` first (fsync of the run directory), then removing
it: a kill at any point leaves either a whole checkpoint or hidden trash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from ._api import normalise_metrics, prepare
from ._commit import TRASH_PREFIX, CommitResult, discard
from ._format import DEFAULT_CHUNK_SIZE, CodecConfig
from ._lock import WriterLock
from ._pointers import DanglingPointerError, read_pointer, set_pointer
from ._read import CheckpointReader, MapLocation, read_manifest
from ._retention import (
    AnyOf,
    Candidate,
    KeepBest,
    KeepEvery,
    KeepLast,
    Mode,
    Policy,
    qualifies,
    ranked,
    victims,
)
from ._retention import best_step as pick_best
from ._rundir import CheckpointInfo, RunScan, info_from, scan
from ._storage import LocalStorage, Storage
from ._workers import WorkerPool
from ._writer import SaveHandle, Writer, close_after_error
from ._writer import check_arguments as check_writer_arguments
from .errors import (
    CheckpointNotFoundError,
    CkptError,
    CorruptCheckpointError,
    SaveRefusedError,
    WriterClosedError,
)

log = logging.getLogger(__name__)

Which = int | Literal["best", "latest"] | None


def build_policy(
    keep_last: int | None,
    keep_best: int | None,
    keep_every: int | None,
    metric: str | None,
    mode: Mode,
) -> Policy | None:
    """The manager's retention policy; None (keep everything) without keep_last."""
    for name, value in (
        ("keep_last", keep_last),
        ("keep_best", keep_best),
        ("keep_every", keep_every),
    ):
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{name} must be a positive int or None, not {value!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    if keep_best is not None and metric is None:
        raise ValueError("keep_best needs metric=, the name of the metric to rank by")
    if keep_last is None:
        return None
    policies: list[Policy] = [KeepLast(keep_last)]
    if keep_best is not None and metric is not None:
        policies.append(KeepBest(keep_best, metric, mode))
    if keep_every is not None:
        policies.append(KeepEvery(keep_every))
    return AnyOf(tuple(policies))


class CheckpointManager:
    """Save, retain and resume the checkpoints of one training run.

    >>> with CheckpointManager("runs/exp1", keep_last=3, keep_best=1,
    ...                        metric="val_loss", mode="min", codec="zstd") as manager:
    ...     manager.save(step, state, metrics={"val_loss": 0.31})
    ...     state = manager.load()      # newest sound checkpoint, or None
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        keep_every: int | None = None,
        metric: str | None = None,
        mode: Mode = "min",
        codec: str = "none",
        level: int = 3,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        threads: int | None = None,
        max_pending: int = 1,
        exit_timeout: float = 60.0,
        read_only: bool = False,
        name_format: str = "step-{step:09d}",
        storage: Storage | None = None,
        _before_rename: Callable[[str], None] | None = None,
    ) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.metric = metric
        self.mode: Mode = mode
        self.read_only = read_only
        self.name_format = name_format
        self.codec = CodecConfig(codec, level, chunk_size)
        self._policy = build_policy(keep_last, keep_best, keep_every, metric, mode)
        self._before_rename = _before_rename
        self._index_lock = threading.RLock()
        self._lock: WriterLock | None = None
        self._writer: Writer | None = None
        self._closed = False
        self._handles: list[SaveHandle] = []
        self._loaded_step: int | None = None
        check_writer_arguments(threads, max_pending)  # before the run directory is made
        if not read_only:
            os.makedirs(self.directory, exist_ok=True)
        elif not os.path.isdir(self.directory):
            raise CheckpointNotFoundError(f"no run directory at {self.directory}")
        self.storage: Storage = storage or LocalStorage(self.directory)
        if not read_only:
            self._lock = WriterLock(self.directory)
            self._lock.acquire()
        try:
            self._scan = scan(self.storage)
            self._report_scan()
            if not read_only:
                self._clean_leftovers()
                # A crash between a commit (or a retirement) and the pointer update
                # leaves a pointer stale or dangling; put both right before any save.
                self._update_pointers()
                self._writer = Writer(threads, max_pending, exit_timeout, self._after_commit)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    # -- opening ------------------------------------------------------------------------
    def _report_scan(self) -> None:
        found = self._scan
        for name in found.foreign:
            log.debug("ignoring %s in %s: not a ckptstore checkpoint", name, self.directory)
        for name, why in found.broken.items():
            log.warning("%s/%s is not a usable checkpoint: %s", self.directory, name, why)
        for info in found.checkpoints.values():
            if not info.sound:
                log.warning(
                    "checkpoint %s is unsound and will be skipped: %s", info.name, info.problem
                )

    def _clean_leftovers(self) -> None:
        """Remove what a crash left half-written; only ever under the writer lock."""
        for name in self._scan.leftovers:
            log.debug("removing crash leftover %s/%s", self.directory, name)
            if self.storage.kind(name) == "dir":
                discard(self.storage, name)
            else:
                with contextlib.suppress(OSError):
                    self.storage.remove_file(name)
        self._scan.leftovers.clear()

    # -- the index ----------------------------------------------------------------------
    def _candidates(self) -> list[Candidate]:
        with self._index_lock:
            return [
                Candidate(c.step, c.metrics) for c in self._scan.checkpoints.values() if c.sound
            ]

    def steps(self) -> list[int]:
        """Steps of the committed, sound checkpoints, oldest first."""
        with self._index_lock:
            return self._scan.sound_steps()

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint (sound or not), oldest first."""
        with self._index_lock:
            return [self._scan.checkpoints[s] for s in sorted(self._scan.checkpoints)]

    @property
    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    @property
    def best_step(self) -> int | None:
        """The best checkpoint by the manager's metric; without a metric (a read-only
        manager, say), the checkpoint the `best` pointer names, if it is one."""
        if self.metric is not None:
            return pick_best(self._candidates(), self.metric, self.mode)
        try:
            target = read_pointer(self.storage, "best")
        except (DanglingPointerError, OSError):
            return None
        with self._index_lock:
            named = [c.step for c in self._scan.checkpoints.values() if c.name == target]
        return named[0] if named else None

    def path_for(self, step: int) -> str:
        with self._index_lock:
            info = self._scan.checkpoints.get(step)
        name = info.name if info else self.name_format.format(step=step)
        return os.path.join(self.directory, name)

    def scan(self) -> RunScan:
        """A fresh look at the directory (what the CLI shows)."""
        return scan(self.storage)

    # -- saving -------------------------------------------------------------------------
    def _require_writer(self) -> Writer:
        if self._writer is None:
            raise WriterClosedError(
                f"manager of {self.directory} is read-only or closed; saving needs a writer"
            )
        return self._writer

    def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> SaveHandle:
        """Snapshot `state` as checkpoint `step` and return; the write goes on behind.

        A step not newer than the newest checkpoint (saved or pending) is refused,
        unless `overwrite=True`: then every checkpoint at or after `step` is retired
        first, so a stale branch never wins the next resume.
        """
        writer = self._require_writer()
        writer.raise_error()
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, not {step!r}")
        newest = self._newest_step()
        rollback = newest is not None and step <= newest
        if rollback and not overwrite:
            raise SaveRefusedError(
                f"step {step} is not newer than step {newest} already in "
                f"{self.directory}; pass overwrite=True to retire checkpoints from step "
                f"{step} on (after resuming from an older one)"
            )
        name = self.name_format.format(step=step)
        # Checked and planned before any rollback: a state that save() refuses must not
        # cost the user the checkpoints it was meant to replace.
        build = prepare(
            self.storage,
            name,
            state,
            step=step,
            metrics=metrics,
            metadata=metadata,
            codec=self.codec,
            before_rename=self._before_rename,
        )
        value = normalise_metrics(metrics).get(self.metric or "")
        if self.metric is not None and value is not None and not qualifies(value):
            log.warning(
                "step %d: %s is %s; it can never be the best checkpoint", step, self.metric, value
            )
        elif self.metric is not None and metrics and value is None:
            # metrics given without the ranking one: likely a misspelt name. A save with no
            # metrics at all (a mid-epoch checkpoint) is left out of the ranking silently.
            log.warning(
                "step %d: metrics have no %r (they have %s); it can never be the best checkpoint",
                step,
                self.metric,
                sorted(metrics),
            )
        if rollback:
            writer.wait()
            self._retire_from(step)
        self._clear_unusable(name, overwrite)
        handle = writer.submit(build)
        self._handles = [h for h in self._handles if not h.done()] + [handle]
        return handle

    def _clear_unusable(self, name: str, overwrite: bool) -> None:
        """Make room when the new checkpoint's name is taken by something unusable.

        A directory there that is not an indexed checkpoint (a manifest that no longer
        parses, one from a newer ckptstore, or a hand-made directory) would make the
        commit fail on every retry. It is never deleted: with `overwrite=True` it is
        renamed aside, where retention never looks; without, the save is refused.
        """
        if self.storage.kind(name) is None:
            return
        with self._index_lock:
            indexed = any(c.name == name for c in self._scan.checkpoints.values())
        if indexed:
            return  # a pending or committed save of this step: the commit says so
        why = self._scan.broken.get(name, "it has no readable manifest")
        aside = f"{name}.unusable-{uuid.uuid4().hex[:8]}"
        if not overwrite:
            raise SaveRefusedError(
                f"{self.directory}/{name} already exists and is not a usable checkpoint "
                f"({why}); pass overwrite=True to move it aside (to {aside}) and save"
            )
        self._require_writer().wait()
        self.storage.rename(name, aside)
        self.storage.fsync_dir(".")
        with self._index_lock:
            self._scan.broken.pop(name, None)
        log.warning(
            "moved %s/%s aside to %s (%s); it is kept, not deleted",
            self.directory,
            name,
            aside,
            why,
        )

    def _newest_step(self) -> int | None:
        """The newest step committed or still pending.

        A save that failed does not count, so retrying its step is not a rollback. A
        handle is pending until after its commit is in the index (`_after_commit`
        runs before the handle is finished), so no step is missed in between.
        """
        pending = [h.step for h in self._handles if not h.done() and h.step is not None]
        with self._index_lock:
            return max([*self._scan.checkpoints, *pending], default=None)

    def _retire_from(self, step: int) -> None:
        with self._index_lock:
            doomed = [c for s, c in self._scan.checkpoints.items() if s >= step]
        for info in sorted(doomed, key=lambda c: -c.step):  # newest first: resume stays sane
            log.debug("retiring %s (overwrite from step %d)", info.name, step)
            self._delete(info)
        self._update_pointers()

    def _after_commit(self, result: CommitResult) -> None:
        """Runs in the writer thread once `result` is durable: index, pointers, retention."""
        manifest = read_manifest(self.storage, result.name)
        info = info_from(self.storage, result.name, manifest)
        with self._index_lock:
            self._scan.checkpoints[info.step] = info
        self._update_pointers()
        self._apply_retention(just_written=info.step)

    def _update_pointers(self) -> None:
        """Point latest and best at their checkpoints; a failure here never fails a save."""
        with self._index_lock:
            latest = self.latest_step
            best = self.best_step
            names = {s: c.name for s, c in self._scan.checkpoints.items()}
        for pointer, step in (("latest", latest), ("best", best)):
            try:
                current = self._pointer_target(pointer)
                if step is None:
                    if current is not None:
                        self.storage.remove_file(pointer)
                elif current != names[step]:
                    set_pointer(self.storage, pointer, names[step])
            except Exception as error:  # whatever it is, the checkpoint is committed
                log.warning(
                    "could not update the %s pointer in %s: %s (checkpoints are "
                    "unaffected; the manager finds them from their manifests)",
                    pointer,
                    self.directory,
                    error,
                )

    def _pointer_target(self, pointer: str) -> str | None:
        try:
            return read_pointer(self.storage, pointer)
        except DanglingPointerError:
            return None

    def _apply_retention(self, just_written: int | None) -> None:
        # Retention deletes only directories named the way this manager names them: a
        # user's `cp -r step-… handpicked` holds a manifest too, and must survive.
        with self._index_lock:
            foreign_named = [
                c.step
                for c in self._scan.checkpoints.values()
                if c.name != self.name_format.format(step=c.step)
            ]
        protected = [just_written, self.latest_step, self.best_step, *foreign_named]
        doomed = victims(self._candidates(), self._policy, protected)
        for step in doomed:
            with self._index_lock:
                info = self._scan.checkpoints[step]
            log.debug(
                "retention: deleting %s (step %d): outside keep_last/keep_best/keep_every",
                info.name,
                step,
            )
            self._delete(info)

    def _delete(self, info: CheckpointInfo) -> None:
        """Retire a checkpoint crash-safely: rename to trash, fsync, then remove."""
        trash = f"{TRASH_PREFIX}{info.name}-{uuid.uuid4().hex[:12]}"
        self.storage.rename(info.name, trash)
        self.storage.fsync_dir(".")
        with self._index_lock:
            self._scan.checkpoints.pop(info.step, None)
        discard(self.storage, trash)

    # -- loading ------------------------------------------------------------------------
    def _resolve(self, which: Which) -> list[CheckpointInfo]:
        """Checkpoints to try, in order, for load(which)."""
        with self._index_lock:
            by_step = dict(self._scan.checkpoints)
        if which is None:
            return [by_step[s] for s in sorted(by_step, reverse=True)]
        if isinstance(which, int) and not isinstance(which, bool):
            if which not in by_step:
                broken = self._scan.broken.get(self.name_format.format(step=which))
                if broken is not None:
                    raise CorruptCheckpointError(
                        f"checkpoint of step {which} is unreadable: {broken}",
                        checkpoint=self.path_for(which),
                    )
                raise CheckpointNotFoundError(
                    f"no checkpoint of step {which} in {self.directory}; "
                    f"steps present: {sorted(by_step)}"
                )
            return [by_step[which]]
        if which not in ("best", "latest"):
            raise ValueError(f"load() takes a step, 'best' or 'latest', not {which!r}")
        try:
            target = read_pointer(self.storage, which)
        except (DanglingPointerError, OSError) as error:
            target, why = None, str(error)
        else:
            why = (
                f"no {which} pointer in {self.directory}"
                if target is None
                else f"{self.directory}/{which} points to {target!r}, which is not a checkpoint"
            )
        derived = self.best_step if which == "best" else self.latest_step
        if which == "best":  # the next best when the best fails its checks
            ranking = ranked(self._candidates(), self.metric, self.mode) if self.metric else []
            fallback = [by_step[c.step] for c in ranking]
        else:
            fallback = [by_step[s] for s in sorted(by_step, reverse=True)]
        match = [c for c in by_step.values() if c.name == target]
        if match:
            # The target first; should it fail its checks, load() goes on to what the
            # manifests say, like a load without a pointer.
            return match + [c for c in fallback if c is not match[0]]
        if target is not None or derived is not None:
            log.warning(
                "%s; using %s",
                why,
                "the best checkpoint by its manifests"
                if which == "best"
                else "the newest sound checkpoint",
            )
        return fallback

    def load(
        self,
        step: Which = None,
        *,
        keys: Iterable[str] | None = None,
        map_location: MapLocation = None,
    ) -> Any:
        """Load a checkpoint's state; the newest sound one by default (None if none).

        `step` may be an int (exactly that checkpoint: errors are raised), "latest" or
        "best". Without a step, unsound checkpoints are skipped with a WARNING and
        the previous sound one is used.
        """
        candidates = self._resolve(step)
        exact = isinstance(step, int) and not isinstance(step, bool)
        self._loaded_step = None
        pool = WorkerPool(min(8, os.cpu_count() or 1))
        try:
            for info in candidates:
                try:
                    if info.problem is not None:
                        raise CorruptCheckpointError(info.problem, checkpoint=info.name)
                    with CheckpointReader(self.storage, info.name) as reader:
                        state = reader.load(keys, map_location, pool)
                    log.debug("loaded %s (step %d)", info.name, info.step)
                    self._loaded_step = info.step
                    return state
                except (CkptError, OSError) as error:
                    if exact or isinstance(error, KeyError):
                        raise
                    log.warning("skipping checkpoint %s: %s", info.name, error)
            return None
        finally:
            pool.close()

    @property
    def loaded_step(self) -> int | None:
        """The step the last `load()` returned (None before any, or when it found none).

        It can be older than `load_step()` said: that checks manifests only, and a load
        that finds the newest checkpoint's bytes corrupt goes on to the previous one."""
        return self._loaded_step

    def load_step(self, step: Which = None) -> int | None:
        """The step `load(step)` would try first (without loading it; manifests only)."""
        candidates = self._resolve(step)
        sound = [c for c in candidates if c.sound]
        return sound[0].step if sound else None

    def restore(
        self,
        objects: Mapping[str, Any],
        step: Which = None,
        *,
        strict: bool = True,
        map_location: MapLocation = None,
    ) -> Any:
        """Load a checkpoint and call `load_state_dict` of each object on its key.

        Returns the whole loaded state (so the caller can read plain values too), or
        None when there is no checkpoint. Modules get `strict=`; a key of `objects`
        missing from the checkpoint raises KeyError when strict.
        """
        state = self.load(step, map_location=map_location)
        if state is None:
            return None
        for key, target in objects.items():
            if key not in state:
                if strict:
                    raise KeyError(f"the checkpoint has no {key!r} to restore")
                log.warning("the checkpoint has no %r; leaving it as it is", key)
                continue
            if hasattr(target, "load_state_dict"):
                try:
                    target.load_state_dict(state[key], strict=strict)
                except TypeError:  # optimizers and schedulers take no strict=
                    target.load_state_dict(state[key])
        return state

    # -- waiting and closing ----------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> None:
        """Block until every pending save is committed; re-raise a writer error once."""
        if self._writer is not None:
            self._writer.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                self._writer.close(timeout)
                self._finish_retention()
        finally:
            self._writer = None
            if self._lock is not None:
                self._lock.release()

    def _finish_retention(self) -> None:
        """One more retention pass as a writer closes, with every save committed.

        A crash between a commit and its retention pass leaves that pass undone (one
        checkpoint too many); the next commit's pass makes up for it, but a session that
        commits nothing (resumed at the last step) would leave the excess. Opening never
        deletes; closing cleanly restores the bound.
        """
        try:
            self._apply_retention(just_written=None)
        except OSError as error:
            log.warning(
                "retention at close failed in %s: %s (checkpoints are intact; the "
                "next writer retries)",
                self.directory,
                error,
            )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.close()
            return
        timeout = self._writer.exit_timeout if self._writer is not None else None
        close_after_error(self.close, timeout, exc)

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "writer"
        return f"<CheckpointManager {self.directory} ({mode}), steps {self.steps()}>"
