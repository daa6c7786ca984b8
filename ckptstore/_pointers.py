"""Pointers: `latest` and `best`, names inside the run directory for its checkpoints.

A pointer is a relative symbolic link (`best -> step-000000120`), so it resolves
whatever the working directory and survives moving the run directory. It is replaced
atomically: a new link is made under a temporary name and renamed over the old one,
then the directory is fsynced. Where the file system refuses links (EPERM, EOPNOTSUPP:
some network and FUSE mounts, Windows without privileges) a small pointer file
holding the checkpoint's name is written the same atomic way.

Pointers are a convenience for people and tools: the manager always derives latest
and best from the manifests, so a lost or stale pointer never changes what is loaded
by step, and a pointer failure never fails a save.
"""

from __future__ import annotations

import errno
import uuid

from ._commit import TMP_PREFIX, write_durable
from ._storage import Storage

POINTERS = ("latest", "best")
MAX_POINTER_FILE = 4096
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EACCES}


class DanglingPointerError(LookupError):
    """A pointer names a checkpoint that is not there (or is not a plain name)."""


def _plain_name(target: str) -> bool:
    return bool(target) and "/" not in target and target not in (".", "..") and "\x00" not in target


def set_pointer(storage: Storage, pointer: str, target: str) -> None:
    """Make `pointer` name `target`, atomically; falls back to a pointer file."""
    tmp = f"{TMP_PREFIX}{pointer}-{uuid.uuid4().hex[:12]}"
    try:
        storage.symlink(target, tmp)
    except OSError as error:
        if error.errno not in _NO_LINKS:
            raise
        write_durable(storage, tmp, (target + "\n").encode("utf-8"))
    try:
        storage.rename(tmp, pointer)
    except BaseException:
        storage.remove_file(tmp)
        raise
    storage.fsync_dir(".")


def read_pointer(storage: Storage, pointer: str) -> str | None:
    """The name a pointer holds (None when there is no pointer); not checked to exist."""
    kind = storage.kind(pointer)
    if kind is None:
        return None
    if kind == "link":
        target = storage.readlink(pointer)
    elif kind == "file":
        try:
            data = storage.read_bytes(pointer, MAX_POINTER_FILE)
        except ValueError:  # larger than any pointer file: not one of ours
            raise DanglingPointerError(
                f"{storage.describe(pointer)} is too large to be a pointer file"
            ) from None
        target = data.decode("utf-8", "replace").strip()
    else:
        raise DanglingPointerError(f"{storage.describe(pointer)} is a directory, not a pointer")
    if not _plain_name(target):
        raise DanglingPointerError(
            f"{storage.describe(pointer)} points to {target!r}, outside the run directory"
        )
    return target


def remove_pointer(storage: Storage, pointer: str) -> None:
    if storage.kind(pointer) in ("link", "file"):
        storage.remove_file(pointer)
        storage.fsync_dir(".")
