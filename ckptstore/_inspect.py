"""What one checkpoint holds, from its manifest alone: tensors, sizes, metrics, metadata.

Used by `ckptstore inspect`. Reads nothing but the manifest (checked as always), so
it is instant on any size of checkpoint; `verify` is what checks the payload.
A tensor that shares its stored bytes with another key (tied weights, views) has
`view_of` set to the entry it lies in and `stored_bytes` 0: its bytes are counted
once, on the key the entry is named after.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch

from ._layout import dtype_from_name
from ._manifest import FileRecord, Manifest
from ._read import read_manifest
from ._storage import Storage
from ._tree import unflatten
from .errors import CorruptCheckpointError


def _no_tensor(name: str) -> Any:
    raise CorruptCheckpointError("metadata names a tensor", key=name)


def entry_stored_bytes(manifest: Manifest) -> dict[str, int]:
    """Stored bytes of each entry: its chunks (chunks never straddle two entries)."""
    out = {}
    starts = {name: [c.raw_offset for c in f.chunks] for name, f in manifest.files.items()}
    for entry in manifest.entries.values():
        file: FileRecord = manifest.files[entry.file]
        lo = file.header_size + entry.offset
        hi = lo + entry.nbytes
        first = bisect.bisect_left(starts[entry.file], lo)
        total = 0
        for chunk in file.chunks[first:]:
            if chunk.raw_offset >= hi:
                break
            total += chunk.stored_len
        out[entry.name] = total
    return out


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    try:
        size = torch.empty(0, dtype=dtype_from_name(dtype)).element_size()
    except ValueError:
        return None
    return math.prod(shape) * size


def describe(storage: Storage, name: str) -> dict[str, Any]:
    manifest = read_manifest(storage, name)
    stored = entry_stored_bytes(manifest)
    tensors = []
    for record in manifest.tensors.values():
        owner = record.entry == record.name
        tensors.append(
            {
                "key": record.name,
                "dtype": record.dtype,
                "shape": list(record.shape),
                "bytes": _nbytes(record.dtype, record.shape),
                "stored_bytes": stored.get(record.entry, 0) if owner else 0,
                "view_of": None if owner else record.entry,
            }
        )
    return {
        "kind": "checkpoint",
        "path": storage.describe(name),
        "step": manifest.step,
        "created": manifest.created,
        "format_version": manifest.body.get("format_version"),
        "codec": manifest.codec,
        "versions": manifest.versions,
        "metrics": manifest.metrics,
        "metadata": unflatten(manifest.metadata, _no_tensor) if manifest.metadata else None,
        "raw_bytes": manifest.raw_size,
        "stored_bytes": manifest.stored_size,
        "files": [
            {"name": f.name, "size": f.size, "raw_size": f.raw_size, "chunks": len(f.chunks)}
            for f in manifest.files.values()
        ],
        "tensors": tensors,
    }
