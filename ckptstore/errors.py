"""The errors ckptstore raises.

Every error derives from `CkptError`, and each one also derives from the builtin it
really is (`OSError`, `ValueError`, `TypeError`, `TimeoutError`), so `except OSError`
keeps working in code that does not know about us. Each carries the path or key it is
about, and its message says what happened and what to do next.
"""

from __future__ import annotations

import errno as _errno


class CkptError(Exception):
    """Base class of every error raised by ckptstore."""


class UnsupportedValueError(CkptError, TypeError):
    """`save()` met a value the manifest cannot represent; nothing was written."""

    def __init__(self, key_path: str, message: str) -> None:
        super().__init__(f"state{key_path or ''}: {message}")
        self.key_path = key_path


class CorruptCheckpointError(CkptError, ValueError):
    """A checkpoint's files disagree with its manifest (checksum, size, structure)."""

    def __init__(
        self,
        message: str,
        *,
        checkpoint: str | None = None,
        file: str | None = None,
        key: str | None = None,
        offset: int | None = None,
    ) -> None:
        where = ", ".join(
            f"{name} {value}"
            for name, value in (
                ("checkpoint", checkpoint),
                ("file", file),
                ("tensor", key),
                # where the damaged chunk or tensor starts, not where the flipped byte is
                ("starting at byte", offset),
            )
            if value is not None
        )
        super().__init__(f"{message} ({where})" if where else message)
        self.checkpoint = checkpoint
        self.file = file
        self.key = key
        self.offset = offset


class IncompleteCheckpointError(CorruptCheckpointError):
    """A checkpoint lacks its manifest or one of its files (a crash, or a deletion)."""


class FormatVersionError(CkptError, ValueError):
    """The manifest was written by a newer ckptstore than this one."""


class CheckpointNotFoundError(CkptError, FileNotFoundError):
    """No checkpoint exists at the path or step asked for."""


class InsufficientSpaceError(CkptError, OSError):
    """Free space is below the estimated size of the checkpoint; nothing was written."""

    def __init__(self, path: str, needed: int, free: int) -> None:
        super().__init__(
            _errno.ENOSPC,
            f"not enough free space for a checkpoint of about {needed} bytes "
            f"({free} bytes free); free some space or retain fewer checkpoints",
            path,
        )
        self.needed = needed
        self.free = free


class LockedError(CkptError, OSError):
    """Another process holds the writer lock of this run directory."""


class SaveRefusedError(CkptError, ValueError):
    """The save would break an invariant of the run (e.g. a step that is not newer)."""


class WriterClosedError(CkptError, RuntimeError):
    """The background writer was closed; no more saves are accepted."""


class PendingSaveTimeoutError(CkptError, TimeoutError):
    """A pending save did not finish within the time allowed."""
