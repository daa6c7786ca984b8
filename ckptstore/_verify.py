"""Verify a checkpoint from its files alone, and say precisely what is wrong.

Quick verification reads the manifest (parsed, checksummed) and the payload's header
(its stored chunks checksummed, then parsed and compared with the manifest), and
checks that every file is present with its recorded size. Deep verification also
reads every stored chunk (checksum, decodes within its recorded size) and every
entry's plain bytes (checksum). Nothing read is ever executed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ._format import PayloadReader, check_header, read_header
from ._manifest import Manifest
from ._read import CheckpointReader, check_view_bounds, read_manifest
from ._storage import Storage
from .errors import CkptError, CorruptCheckpointError, IncompleteCheckpointError

Status = Literal["sound", "incomplete", "corrupt"]


@dataclass
class Problem:
    status: Status
    reason: str
    file: str | None = None
    key: str | None = None
    offset: int | None = None


@dataclass
class CheckpointReport:
    path: str
    step: int | None = None
    deep: bool = False
    problems: list[Problem] = field(default_factory=list)
    bytes_checked: int = 0

    @property
    def status(self) -> Status:
        if any(p.status == "corrupt" for p in self.problems):
            return "corrupt"
        return "incomplete" if self.problems else "sound"

    @property
    def sound(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "step": self.step,
            "status": self.status,
            "deep": self.deep,
            "bytes_checked": self.bytes_checked,
            "problems": [asdict(p) for p in self.problems],
        }

    def __str__(self) -> str:
        return json.dumps(self.as_dict())


def _problem(error: BaseException) -> Problem:
    status: Status = "incomplete" if isinstance(error, IncompleteCheckpointError) else "corrupt"
    if isinstance(error, CorruptCheckpointError):
        return Problem(status, str(error), error.file, error.key, error.offset)
    return Problem(status, f"{type(error).__name__}: {error}")


def _check_files(
    storage: Storage, name: str, manifest: Manifest, report: CheckpointReport, deep: bool
) -> None:
    with CheckpointReader(storage, name, manifest) as reader:
        readable = True  # files present, sized and described as the manifest says
        for file in manifest.files.values():
            try:
                payload = reader.payload(file.name)
                # The header's chunks are checked even when quick: they are small, and a
                # plain payload's header is otherwise only parsed, so a flip in a part
                # the manifest does not restate (padding, metadata) would pass.
                _check_chunks(payload, below=file.header_size)
                check_header(read_header(payload), manifest, file, file.name)
            except (CkptError, OSError, EOFError) as error:
                report.problems.append(_problem(error))
                readable = False
                continue
            if deep:
                try:
                    _check_chunks(payload, start=file.header_size)
                except (CkptError, OSError, EOFError) as error:
                    report.problems.append(_problem(error))
        # After a bad chunk, the tensor checks still run: they name the tensors it hit.
        if deep and readable:
            for record in manifest.tensors.values():
                try:
                    check_view_bounds(record, manifest.entries[record.entry])
                except (CkptError, ValueError) as error:
                    report.problems.append(_problem(error))
            for entry in manifest.entries.values():
                try:
                    reader.read_entry(entry)
                except (CkptError, ValueError, OSError) as error:
                    problem = _problem(error)
                    if problem.key is None:  # a bad compressed chunk: name its tensor
                        problem.key = entry.name
                    report.problems.append(problem)
        report.bytes_checked = reader.bytes_read


def _check_chunks(payload: PayloadReader, start: int = 0, below: int | None = None) -> None:
    """Stored chunks whose plain bytes begin in [start, below): checksum, and each
    decodes to exactly its recorded size."""
    for chunk in payload.record.chunks:
        if chunk.raw_offset < start or (below is not None and chunk.raw_offset >= below):
            continue
        if chunk.transform == "raw":
            payload.chunk_bytes(chunk, verify=True)
        else:
            payload.decode(chunk, memoryview(bytearray(chunk.raw_len)))


def verify_checkpoint(storage: Storage, name: str, deep: bool = False) -> CheckpointReport:
    report = CheckpointReport(storage.describe(name), deep=deep)
    try:
        manifest = read_manifest(storage, name)
    except (CkptError, OSError) as error:
        report.problems.append(_problem(error))
        return report
    report.step = manifest.step
    _check_files(storage, name, manifest, report, deep)
    return report
