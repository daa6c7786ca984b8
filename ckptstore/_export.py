"""Export a checkpoint as one plain `.safetensors` file that any safetensors reader opens.

Every key of the state becomes its own tensor, aliases too: tied weights and views,
stored once in the checkpoint, are written once per key (cloned), since safetensors
has no notion of shared storage. The tensors are exactly what `ckptstore.load`
returns, each checked against its checksum on the way.

Dtypes safetensors cannot hold are written in a form it can, and listed in the file's
`__metadata__` (a JSON object under "ckptstore.converted", key -> original dtype):

- complex (complex128, complex32, and complex64 where the installed safetensors has
  no "C64"): as the real pair, `torch.view_as_real`, shape `[..., 2]`; the original
  is `torch.view_as_complex(t)` (after `.to(float32)` for complex32 if needed);
- any other dtype safetensors lacks: as its raw bytes, uint8, shape `[nbytes]`.

The non-tensor part of the state (numbers, strings, the structure) is not exported;
it stays in the checkpoint's manifest.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field

import safetensors.torch
import torch

from ._read import CheckpointReader
from ._runverify import resolve_checkpoint
from ._tree import flatten
from ._workers import WorkerPool


@dataclass
class ExportResult:
    path: str
    tensors: int
    aliases: int  # keys that shared storage with another key and were cloned
    converted: dict[str, str] = field(default_factory=dict)  # key -> original dtype
    bytes: int = 0


@functools.cache
def _supported(dtype: torch.dtype) -> bool:
    try:
        safetensors.torch.save({"probe": torch.zeros(1, dtype=dtype)})
    except (KeyError, ValueError, TypeError, RuntimeError):
        return False
    return True


def _portable(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The tensor in a dtype safetensors holds, and whether it had to be converted."""
    if _supported(tensor.dtype):
        return tensor, False
    if tensor.is_complex():
        return torch.view_as_real(tensor), True
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8), True


def _tensors(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], int | None]:
    storage, name = resolve_checkpoint(directory)
    pool = WorkerPool(min(8, os.cpu_count() or 1))
    try:
        with CheckpointReader(storage, name) as reader:
            state = reader.load(pool=pool)
            step = reader.manifest.step
    finally:
        pool.close()
    _, leaves = flatten(state)
    return {leaf.name: leaf.tensor for leaf in leaves}, step


def export_safetensors(
    checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]
) -> ExportResult:
    """Write `checkpoint`'s tensors to the safetensors file `out` (replaced atomically)."""
    tensors, step = _tensors(checkpoint)
    owners: dict[int, int] = {}
    for t in tensors.values():
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            owners[ptr] = owners.get(ptr, 0) + 1
    result = ExportResult(os.path.abspath(os.fspath(out)), len(tensors), 0)
    ready: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        shared = tensor.numel() > 0 and owners[tensor.untyped_storage().data_ptr()] > 1
        result.aliases += shared
        portable, converted = _portable(tensor)
        if converted:
            result.converted[key] = str(tensor.dtype).removeprefix("torch.")
        if shared or converted or not portable.is_contiguous():
            portable = portable.clone(memory_format=torch.contiguous_format)
        ready[key] = portable
    metadata = {"format": "pt", "ckptstore.source": os.path.abspath(os.fspath(checkpoint))}
    if step is not None:
        metadata["ckptstore.step"] = str(step)
    if result.converted:
        metadata["ckptstore.converted"] = json.dumps(result.converted, sort_keys=True)
    tmp = f"{result.path}.tmp-{os.getpid()}"
    try:
        safetensors.torch.save_file(ready, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, result.path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    result.bytes = os.path.getsize(result.path)
    return result
