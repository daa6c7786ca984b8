"""A small pool of daemon threads for the codec and the checksums, and their scratch.

Not `concurrent.futures.ThreadPoolExecutor`: at interpreter exit that pool is shut
down (its threads joined, new work refused) *before* atexit handlers run, and the
writer's atexit handler needs workers to finish a pending save in its bounded grace
period. These threads are daemons, so a stuck write can never block exit either.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class WorkerPool:
    def __init__(self, threads: int, name: str = "ckptstore-worker") -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self.threads = threads
        self._tasks: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._workers = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for worker in self._workers:
            worker.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as error:  # handed to whoever waits on the future
                    future.set_exception(error)

    def submit(self, fn: Callable[[], R]) -> Future[R]:
        future: Future[R] = Future()
        self._tasks.put((future, fn))
        return future

    def imap(self, fn: Callable[[T], R], items: Iterable[T], window: int = 0) -> Iterator[R]:
        """fn over items on the pool, results in order, at most `window` in flight."""
        window = window or 2 * self.threads
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(self.submit(lambda item=item: fn(item)))  # type: ignore[misc]
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def run(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return list(self.imap(fn, items))

    def close(self) -> None:
        for _ in self._workers:
            self._tasks.put(None)
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join()


class ThreadScratch(threading.local):
    """One growing buffer per thread, reused from call to call: for data that is consumed
    before the same thread asks again (a fresh buffer each time was page-faulted in)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def view(self, size: int) -> memoryview:
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        return memoryview(self.buffer)[:size]
