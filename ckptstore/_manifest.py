"""The manifest: one strict-JSON file that describes a checkpoint and is its truth.

It is written last, so its presence under the final directory name means every other
file was already durable. It carries a checksum of its own canonical bytes (the
compact UTF-8 JSON of everything but the checksum, keys in file order), so a flipped
digit is caught rather than parsed into a wrong size or offset. Non-finite floats are
written as `{"float": "nan" | "inf" | "-inf"}` so the file stays RFC 8259 JSON that
`jq` and every other reader accepts.

Layout (format version 1)::

    format, format_version, created (UTC, ISO 8601), step, metrics, metadata,
    versions {ckptstore, torch, python, ...},
    codec {name, level, chunk_size},
    files {name: {size, raw_size, header_size, checksum, chunks: [[raw_offset,
           raw_len, stored_offset, stored_len, transform, checksum], ...]}},
    entries {name: {file, dtype, shape, st_dtype, st_shape, offset, nbytes, checksum}},
    tensors {name: {entry, dtype, shape, offset, stride}},
    state  <the skeleton, see _tree>,
    checksum "xxh3-64:<16 hex digits>"

An *entry* is a byte range of the payload (one safetensors tensor); a *tensor* is a
key of the user's state, which is an entry or a view into one (tied weights).
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import xxhash

from .errors import CorruptCheckpointError, FormatVersionError

FORMAT_NAME = "ckptstore"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 512 << 20  # far above any real manifest; bounds a hostile one
CHECKSUM_PREFIX = "xxh3-64:"


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """The checksum used everywhere: xxh3, 64 bits, as 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


def hash_parts(parts: Iterable[bytes | bytearray | memoryview]) -> str:
    """:func:`hash_bytes` of the parts' concatenation, without concatenating them."""
    state = xxhash.xxh3_64()
    for part in parts:
        state.update(part)
    return state.hexdigest()


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def encode_manifest(body: Mapping[str, Any]) -> bytes:
    """The manifest's bytes, with its checksum appended as the last key."""
    if "checksum" in body:
        raise ValueError("the manifest body must not carry a checksum already")
    signed = dict(body, checksum=CHECKSUM_PREFIX + hash_bytes(_canonical(body)))
    text = json.dumps(signed, indent=1, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    # json reads "1e999" as inf without asking parse_constant; the canonical re-encoding
    # (allow_nan=False) would then fail outside our error handling.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def decode_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Parse and check a manifest; raise CorruptCheckpointError naming `where`."""
    try:
        body = json.loads(
            data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CorruptCheckpointError(f"manifest is not valid JSON: {error}", file=where) from None
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError("not a ckptstore manifest", file=where)
    version = body.get("format_version")
    if type(version) is not int:
        raise CorruptCheckpointError("manifest has no integer format_version", file=where)
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{where}: written in format version {version}, but this ckptstore reads up to "
            f"version {FORMAT_VERSION}; upgrade ckptstore to read it"
        )
    claimed = body.pop("checksum", None)
    actual = CHECKSUM_PREFIX + hash_bytes(_canonical(body))
    if claimed != actual:
        raise CorruptCheckpointError(
            f"manifest checksum mismatch (recorded {claimed!r}, computed {actual!r})",
            file=where,
        )
    return body


def encode_number(value: float | int) -> Any:
    """A metric value as strict JSON."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metrics must be numbers, not {type(value).__name__}")
    if isinstance(value, int) and abs(value) > 2**53:
        # Metrics are compared as floats; an int beyond float range could not be read back.
        raise TypeError(f"metric {value} is too large to compare as a float")
    value = float(value) if not isinstance(value, int) else value
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    return value


def decode_number(value: Any) -> float:
    if isinstance(value, dict) and value.get("float") in ("nan", "inf", "-inf"):
        return float(value["float"])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorruptCheckpointError(f"metric value {value!r} is not a number")
    try:
        return float(value)
    except OverflowError:
        raise CorruptCheckpointError(f"metric value {value} is out of range") from None


def library_versions() -> dict[str, str]:
    import safetensors
    import torch
    import zstandard

    from . import __version__

    return {
        "ckptstore": __version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "safetensors": getattr(safetensors, "__version__", "unknown"),
        "zstandard": zstandard.__version__,
    }


# --- typed records --------------------------------------------------------------------
# The parser below checks every field's type and bound before anything is allocated or
# read, so a hostile manifest fails here with a message, not later with a MemoryError.

MAX_CHUNK_RAW = 256 << 20
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Chunk:
    raw_offset: int
    raw_len: int
    stored_offset: int
    stored_len: int
    transform: str
    checksum: str


@dataclass(frozen=True)
class FileRecord:
    name: str
    size: int
    raw_size: int
    header_size: int
    checksum: str
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class EntryRecord:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    st_dtype: str
    st_shape: tuple[int, ...]
    offset: int  # in the data section of `file`
    nbytes: int
    checksum: str


@dataclass(frozen=True)
class TensorRecord:
    name: str
    entry: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # bytes into the entry
    stride: tuple[int, ...] | None


@dataclass(frozen=True)
class Manifest:
    step: int | None
    created: str
    metrics: dict[str, float]
    metadata: Any  # a skeleton (see _tree), decoded on demand
    versions: dict[str, str]
    codec: dict[str, Any]
    files: dict[str, FileRecord]
    entries: dict[str, EntryRecord]
    tensors: dict[str, TensorRecord]
    state: Any
    body: dict[str, Any]  # the JSON as read, for tools that show it

    @property
    def stored_size(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def raw_size(self) -> int:
        return sum(f.raw_size for f in self.files.values())


class _Fields:
    """Typed access to one JSON object, with errors that say where the problem is."""

    def __init__(self, obj: Any, where: str, context: str) -> None:
        if not isinstance(obj, dict):
            self._fail(where, f"{context} is not an object")
        self.obj, self.where, self.context = obj, where, context

    @staticmethod
    def _fail(where: str, message: str) -> NoReturn:
        raise CorruptCheckpointError(f"malformed manifest: {message}", file=where)

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        value = self.obj.get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            self._fail(self.where, f"{self.context}.{key} is missing or not {kind}")
        return value

    def count(self, key: str) -> int:
        value = self.get(key, int)
        if value < 0 or value > 1 << 62:
            self._fail(self.where, f"{self.context}.{key} = {value} is out of range")
        return int(value)

    def checksum(self, key: str) -> str:
        value = self.get(key, str)
        if len(value) != 16 or not set(value) <= _HEX:
            self._fail(self.where, f"{self.context}.{key} is not a 16-digit hex checksum")
        return str(value)

    def shape(self, key: str) -> tuple[int, ...]:
        value = self.get(key, list)
        if len(value) > 64 or not all(type(n) is int and 0 <= n < 1 << 62 for n in value):
            self._fail(self.where, f"{self.context}.{key} is not a shape")
        return tuple(value)


def _parse_chunks(raw: Any, where: str, context: str) -> tuple[Chunk, ...]:
    if not isinstance(raw, list):
        _Fields._fail(where, f"{context}.chunks is not a list")
    chunks = []
    for i, item in enumerate(raw):
        ok = isinstance(item, list) and len(item) == 6
        ok = ok and all(type(n) is int and 0 <= n < 1 << 62 for n in item[:4])
        ok = ok and isinstance(item[4], str) and isinstance(item[5], str)
        if not ok:
            _Fields._fail(where, f"{context}.chunks[{i}] is malformed")
        chunk = Chunk(*item)
        if chunk.raw_len > MAX_CHUNK_RAW or len(chunk.checksum) != 16:
            _Fields._fail(where, f"{context}.chunks[{i}] is out of bounds")
        chunks.append(chunk)
    return tuple(chunks)


def _parse_file(name: str, raw: Any, where: str) -> FileRecord:
    if "/" in name or name in ("", ".", "..") or name == MANIFEST_NAME:
        _Fields._fail(where, f"payload file name {name!r} is not a plain file name")
    f = _Fields(raw, where, f"files[{name!r}]")
    record = FileRecord(
        name,
        f.count("size"),
        f.count("raw_size"),
        f.count("header_size"),
        f.checksum("checksum"),
        _parse_chunks(f.obj.get("chunks"), where, f.context),
    )
    raw_at = stored_at = 0
    for chunk in record.chunks:
        if chunk.raw_offset != raw_at or chunk.stored_offset != stored_at:
            _Fields._fail(where, f"{f.context}: chunks are not contiguous at byte {raw_at}")
        raw_at += chunk.raw_len
        stored_at += chunk.stored_len
    if raw_at != record.raw_size or stored_at != record.size:
        _Fields._fail(where, f"{f.context}: chunks do not add up to the recorded sizes")
    if not 8 <= record.header_size <= record.raw_size:
        _Fields._fail(where, f"{f.context}: header_size out of range")
    return record


def _parse_entry(name: str, raw: Any, where: str, files: dict[str, FileRecord]) -> EntryRecord:
    f = _Fields(raw, where, f"entries[{name!r}]")
    record = EntryRecord(
        name,
        f.get("file", str),
        f.get("dtype", str),
        f.shape("shape"),
        f.get("st_dtype", str),
        f.shape("st_shape"),
        f.count("offset"),
        f.count("nbytes"),
        f.checksum("checksum"),
    )
    file = files.get(record.file)
    if file is None:
        _Fields._fail(where, f"{f.context} names unknown file {record.file!r}")
    if record.offset + record.nbytes > file.raw_size - file.header_size:
        _Fields._fail(where, f"{f.context} lies beyond the end of its file")
    return record


def _parse_tensor(name: str, raw: Any, where: str) -> TensorRecord:
    f = _Fields(raw, where, f"tensors[{name!r}]")
    stride = f.obj.get("stride")
    if stride is not None:
        stride = f.shape("stride")
    return TensorRecord(
        name, f.get("entry", str), f.get("dtype", str), f.shape("shape"), f.count("offset"), stride
    )


def parse_manifest(body: dict[str, Any], where: str) -> Manifest:
    """Turn a checked manifest body into typed records, bounding every number."""
    f = _Fields(body, where, "manifest")
    step = body.get("step")
    if step is not None and type(step) is not int:
        f._fail(where, "step is not an integer")
    files = {n: _parse_file(n, r, where) for n, r in f.get("files", dict).items()}
    entries = {n: _parse_entry(n, r, where, files) for n, r in f.get("entries", dict).items()}
    tensors = {n: _parse_tensor(n, r, where) for n, r in f.get("tensors", dict).items()}
    for record in tensors.values():
        if record.entry not in entries:
            f._fail(where, f"tensor {record.name!r} refers to unknown entry {record.entry!r}")
    metrics = {str(k): decode_number(v) for k, v in f.get("metrics", dict).items()}
    versions = {str(k): str(v) for k, v in f.get("versions", dict).items()}
    return Manifest(
        step,
        str(body.get("created", "")),
        metrics,
        body.get("metadata"),
        versions,
        f.get("codec", dict),
        files,
        entries,
        tensors,
        body.get("state"),
        body,
    )
