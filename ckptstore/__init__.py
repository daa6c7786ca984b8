"""ckptstore: async, crash-safe, compressed checkpoints for PyTorch.

The public API is what `__all__` lists; modules with a leading underscore are
internal and may change without notice.
"""

__version__ = "0.1.0"

from ._api import Checkpointer, load, save, verify
from ._commit import CommitResult
from ._manager import CheckpointManager
from ._rundir import CheckpointInfo
from ._runverify import PointerReport, RunReport, verify_run
from ._verify import CheckpointReport, Problem
from ._writer import SaveHandle
from .errors import (
    CheckpointNotFoundError,
    CkptError,
    CorruptCheckpointError,
    FormatVersionError,
    IncompleteCheckpointError,
    InsufficientSpaceError,
    LockedError,
    PendingSaveTimeoutError,
    SaveRefusedError,
    UnsupportedValueError,
    WriterClosedError,
)
from .train import Position, ResumableLoader, TrainingCheckpointer

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReport",
    "Checkpointer",
    "CkptError",
    "CommitResult",
    "CorruptCheckpointError",
    "FormatVersionError",
    "IncompleteCheckpointError",
    "InsufficientSpaceError",
    "LockedError",
    "PendingSaveTimeoutError",
    "PointerReport",
    "Position",
    "Problem",
    "ResumableLoader",
    "RunReport",
    "SaveHandle",
    "SaveRefusedError",
    "TrainingCheckpointer",
    "UnsupportedValueError",
    "WriterClosedError",
    "load",
    "save",
    "verify",
    "verify_run",
]
