"""The writer lock: one process writes a run directory, any number read it.

The lock is `filelock`'s (flock on POSIX), so it is released by the kernel when the
holder dies, even by `kill -9`: a crashed trainer never leaves a stale lock. The
holder writes its pid, host and start time to `.lock.owner` so that a second writer's
error can say who holds it.
"""

from __future__ import annotations

import json
import os
import socket
import time

import filelock

from .errors import LockedError

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner"


class WriterLock:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._lock = filelock.FileLock(os.path.join(directory, LOCK_NAME), timeout=0)

    def acquire(self) -> None:
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            raise LockedError(
                f"{self.directory} is being written by {self._owner()}; only one writer may "
                "save to a run directory (open it with read_only=True to read)"
            ) from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        # Informational only (the flock is the lock), so no fsync.
        with open(os.path.join(self.directory, OWNER_NAME), "w", encoding="utf-8") as f:
            json.dump(owner, f)

    def _owner(self) -> str:
        try:
            with open(os.path.join(self.directory, OWNER_NAME), encoding="utf-8") as f:
                owner = json.load(f)
            return f"pid {owner['pid']} on host {owner['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    @property
    def held(self) -> bool:
        return bool(self._lock.is_locked)
