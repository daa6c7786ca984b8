"""The background writer: one thread that commits snapshots while training goes on.

`submit` runs in the caller's thread: it re-raises an earlier failure (once), waits
for a free slot (at most `max_pending` saves in flight, so a slow disk slows the
trainer down instead of filling host memory with snapshots), takes the snapshot and
queues it. The writer thread commits queued saves in order, then runs the caller's
`after_commit` (pointers, retention) for each.

An error in the writer (ENOSPC, EIO, a read-only directory) is kept and re-raised
*as itself*, exactly once, by the next `submit`, `wait` or `close`, or by the
handle's `wait`. If no call comes, it is logged at ERROR when the interpreter exits.
At exit, pending saves get `exit_timeout` seconds to finish; the thread is a daemon,
so a hung disk cannot block exit: a save cut off there leaves only its temporary
directory, which the next writer removes.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable

from ._commit import CommitResult, SaveRequest, commit
from ._snapshot import StagingPool
from ._workers import WorkerPool
from .errors import PendingSaveTimeoutError, WriterClosedError

log = logging.getLogger(__name__)

_LIVE_WRITERS: weakref.WeakSet[Writer] = weakref.WeakSet()


class SaveHandle:
    """The future of one save: `done()`, `wait()`."""

    def __init__(self, writer: Writer, name: str, step: int | None) -> None:
        self.name = name
        self.step = step
        self._writer = writer
        self._done = threading.Event()
        self._result: CommitResult | None = None
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        state = "failed" if self._error else ("committed" if self.done() else "pending")
        return f"<SaveHandle {self.name} {state}>"

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> CommitResult:
        """Block until committed; re-raise the save's error (which then counts as reported)."""
        if not self._done.wait(timeout):
            raise PendingSaveTimeoutError(f"save of {self.name} still pending after {timeout}s")
        if self._error is not None:
            self._writer._mark_reported(self._error)
            raise self._error
        assert self._result is not None
        return self._result

    def _finish(self, result: CommitResult | None, error: BaseException | None) -> None:
        self._result, self._error = result, error
        self._done.set()


def check_arguments(threads: int | None, max_pending: int) -> None:
    """Refuse bad writer arguments; callers run this before they touch the disk."""
    if max_pending < 1:
        raise ValueError(f"max_pending must be at least 1, not {max_pending}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")


class Writer:
    def __init__(
        self,
        threads: int | None = None,
        max_pending: int = 1,
        exit_timeout: float = 60.0,
        after_commit: Callable[[CommitResult], None] | None = None,
    ) -> None:
        check_arguments(threads, max_pending)
        self.exit_timeout = exit_timeout
        self._after_commit = after_commit
        self._slots = threading.BoundedSemaphore(max_pending)
        self._queue: queue.SimpleQueue[tuple[SaveRequest, SaveHandle] | None] = queue.SimpleQueue()
        self._pool = WorkerPool(threads or min(8, os.cpu_count() or 1))
        self.staging = StagingPool(keep=max_pending + 1)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._pending: list[SaveHandle] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ckptstore-writer", daemon=True)
        self._thread.start()
        _LIVE_WRITERS.add(self)

    # -- caller side -------------------------------------------------------------------
    def raise_error(self) -> None:
        """Re-raise a failure of an earlier save, once."""
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _mark_reported(self, error: BaseException) -> None:
        with self._lock:
            if self._error is error:
                self._error = None

    def submit(self, build: Callable[[StagingPool], SaveRequest]) -> SaveHandle:
        """Take a snapshot with `build` once a slot is free, and queue it."""
        if self._closed:
            raise WriterClosedError("this writer is closed; open a new one to save again")
        self.raise_error()
        self._slots.acquire()
        try:
            self.raise_error()  # a save that failed while we waited for the slot
            request = build(self.staging)
        except BaseException:
            self._slots.release()
            raise
        handle = SaveHandle(self, request.name, request.step)
        with self._lock:
            self._pending = [h for h in self._pending if not h.done()] + [handle]
        self._queue.put((request, handle))
        return handle

    def wait(self, timeout: float | None = None) -> None:
        """Block until every queued save is committed; re-raise a failure once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            pending = list(self._pending)
        for handle in pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not handle._done.wait(left):
                raise PendingSaveTimeoutError(
                    f"save of {handle.name} still pending after {timeout}s"
                )
        self.raise_error()

    def pending(self) -> int:
        with self._lock:
            return sum(not h.done() for h in self._pending)

    def close(self, timeout: float | None = None) -> None:
        """Finish pending saves, stop the thread; re-raise a failure once."""
        if self._closed:
            self.raise_error()
            return
        try:
            self.wait(timeout)
        finally:
            self._closed = True
            self._queue.put(None)
            if self._thread is not threading.current_thread():
                self._thread.join(timeout)
            self._pool.close()
            self.staging.clear()
            _LIVE_WRITERS.discard(self)

    # -- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            request, handle = item
            result: CommitResult | None = None
            error: BaseException | None = None
            try:
                result = commit(request, self._pool)
                if self._after_commit is not None:
                    self._after_commit(result)
                _log_commit(result)
            except BaseException as caught:  # kept and re-raised in the caller's thread
                error = caught
                self._keep_error(caught, request)
            finally:
                self.staging.release(request.snapshot.buffer)
                handle._finish(result, error)
                self._slots.release()

    def _keep_error(self, error: BaseException, request: SaveRequest) -> None:
        with self._lock:
            if self._error is None:
                self._error = error
                return
        log.error(
            "save of %s failed too (an earlier failure is not yet reported): %r",
            request.storage.describe(request.name),
            error,
        )

    def _at_exit(self) -> None:
        if not self._closed:
            deadline = time.monotonic() + self.exit_timeout
            for handle in list(self._pending):
                if not handle._done.wait(max(0.0, deadline - time.monotonic())):
                    log.warning(
                        "exiting with the save of %s unfinished after %.0fs; only its "
                        "temporary directory is left, and the next writer removes it",
                        handle.name,
                        self.exit_timeout,
                    )
                    return
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            log.error("a checkpoint save failed and the error was never reported: %r", error)


def close_after_error(
    close: Callable[[float | None], None], timeout: float | None, in_flight: object
) -> None:
    """`close(timeout)` while an exception is in flight: bounded, and never masking it."""
    try:
        close(timeout)
    except Exception as error:
        log.error("while closing after %r, the writer failed too: %r", in_flight, error)


def _log_commit(result: CommitResult) -> None:
    ratio = result.stored_bytes / result.raw_bytes if result.raw_bytes else 1.0
    log.info(
        "committed step %s to %s: %d -> %d bytes (ratio %.3f) in %.2fs",
        result.step,
        result.location,
        result.raw_bytes,
        result.stored_bytes,
        ratio,
        result.seconds,
    )


@atexit.register
def _finish_pending_saves() -> None:
    for writer in list(_LIVE_WRITERS):
        writer._at_exit()


# -- fork --------------------------------------------------------------------------------
# A fork()ed child (a DataLoader worker, a multiprocessing "fork" process, os.fork) gets
# copies of the writers but not their threads, so its copies of pending saves can never
# finish; without this, a child that exits normally would wait `exit_timeout` for them.
# The parent's saves go on in the parent, untouched.
def _forget_writers_in_child() -> None:
    _LIVE_WRITERS.clear()


os.register_at_fork(after_in_child=_forget_writers_in_child)
