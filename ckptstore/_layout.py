"""Plan the payload: which bytes are stored once, where, and how each key maps onto them.

Tensors that share storage (tied embeddings, `x` and `x[:50]`, `w` and `w.t()`) are
stored once. For each group of tensors on one storage the *entry* is the byte range
their views cover; when one member is contiguous and covers the whole range it is
stored as itself (typed, so a plain safetensors reader sees a normal tensor),
otherwise the range is stored as raw uint8 bytes. Every other member is recorded as a
view (dtype, shape, stride, byte offset) into the entry and restored with `set_`, so
the loaded tensors share one storage again.

Empty tensors are never grouped (their data pointers mean nothing), and conjugate or
negative views are materialised first, since their bits live in the view, not in the
bytes.

Entries are laid out in decreasing element size, which keeps each one aligned to its
element size inside the data section (the header is padded to 8 bytes): every entry
can be viewed in place as its dtype, with no copy. The exception is a raw byte range
whose length is not a multiple of its views' element size; such entries go last, and
only they may start unaligned (they are stored as U8, which any reader accepts).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch

from ._tree import Leaf

# safetensors' dtype tags for the dtypes it knows in every version we support.
SAFETENSORS_TAGS: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _tag in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    SAFETENSORS_TAGS[getattr(torch, _name)] = _tag
# Complex numbers are stored as pairs of their real type: safetensors lacks complex128.
COMPLEX_AS_REAL = {
    torch.complex128: torch.float64,
    torch.complex64: torch.float32,
    torch.complex32: torch.float16,
}
HEADER_ALIGN = 8


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def stored_form(dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> tuple[str, list[int]]:
    """The safetensors dtype tag and shape under which an entry's bytes are written."""
    if dtype in SAFETENSORS_TAGS:
        return SAFETENSORS_TAGS[dtype], list(shape)
    if dtype in COMPLEX_AS_REAL:
        return SAFETENSORS_TAGS[COMPLEX_AS_REAL[dtype]], [*shape, 2]
    return "U8", [nbytes]


@dataclass
class Entry:
    """One byte range of the payload's data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    source: torch.Tensor  # what to copy from (a typed tensor, or a uint8 view of storage)
    align: int  # the largest element size of the tensors viewing it
    offset: int = 0  # in the data section, set by `plan`


@dataclass(frozen=True)
class View:
    """How one key of the state is rebuilt from an entry."""

    name: str
    entry: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes into the entry
    stride: tuple[int, ...] | None  # None: contiguous


@dataclass
class Plan:
    entries: list[Entry]
    views: list[View]
    header: bytes  # the complete safetensors header, length prefix included
    data_size: int = field(default=0)

    @property
    def raw_size(self) -> int:
        return len(self.header) + self.data_size


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range of t's storage that its view touches."""
    size = t.element_size()
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return int(t.storage_offset() * size), int((last + 1) * size)


def _group_key(t: torch.Tensor) -> tuple[str, int] | None:
    if t.numel() == 0 or t.untyped_storage().nbytes() == 0:
        return None
    return (str(t.device), t.untyped_storage().data_ptr())


def _plan_group(members: list[Leaf]) -> tuple[Entry, list[View]]:
    spans = [_span(leaf.tensor) for leaf in members]
    align = max(leaf.tensor.element_size() for leaf in members)
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    lo -= lo % align  # every member's offset into the entry stays a multiple of its size
    base = next(
        (
            leaf
            for leaf, span in zip(members, spans, strict=True)
            if span == (lo, hi) and leaf.tensor.is_contiguous()
        ),
        None,
    )
    if base is not None:
        t = base.tensor
        entry = Entry(base.name, t.dtype, tuple(t.shape), hi - lo, t, align)
    else:
        first = members[0].tensor
        raw = torch.empty(0, dtype=torch.uint8, device=first.device)
        raw.set_(first.untyped_storage())
        entry = Entry(members[0].name, torch.uint8, (hi - lo,), hi - lo, raw[lo:hi], align)
    views = []
    for leaf, (start, _) in zip(members, spans, strict=True):
        t = leaf.tensor
        contiguous = leaf is base
        stride = None if contiguous else tuple(t.stride())
        views.append(View(leaf.name, entry.name, t.dtype, tuple(t.shape), start - lo, stride))
    return entry, views


def _materialise(t: torch.Tensor) -> torch.Tensor:
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


def plan(leaves: list[Leaf], metadata: dict[str, str] | None = None) -> Plan:
    """Decide the entries, their order and offsets, and build the safetensors header."""
    groups: dict[tuple[str, int], list[Leaf]] = {}
    singles: list[Leaf] = []
    for leaf in leaves:
        t = _materialise(leaf.tensor)
        key = _group_key(t) if t is leaf.tensor else None  # a fresh copy shares nothing
        if key is None:
            singles.append(Leaf(leaf.name, t, leaf.path))
        else:
            groups.setdefault(key, []).append(leaf)
    for key, members in list(groups.items()):
        if len(members) == 1:  # alone on its storage: store a contiguous copy
            singles.extend(groups.pop(key))
    entries: list[Entry] = []
    views: list[View] = []
    for leaf in singles:
        t = leaf.tensor
        nbytes = t.numel() * t.element_size()
        entries.append(Entry(leaf.name, t.dtype, tuple(t.shape), nbytes, t, t.element_size()))
        views.append(View(leaf.name, leaf.name, t.dtype, tuple(t.shape), 0, None))
    for members in groups.values():
        entry, group_views = _plan_group(members)
        entries.append(entry)
        views.extend(group_views)
    return _lay_out(entries, views, metadata or {})


def _lay_out(entries: list[Entry], views: list[View], metadata: dict[str, str]) -> Plan:
    # An entry whose size is not a multiple of its alignment (a raw byte range of tied
    # views, stored as U8) would shift every later entry off its alignment: put those last.
    order = sorted(
        range(len(entries)),
        key=lambda i: (entries[i].nbytes % entries[i].align != 0, -entries[i].align, i),
    )
    entries = [entries[i] for i in order]
    offset = 0
    header: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
    for entry in entries:
        entry.offset = offset
        tag, shape = stored_form(entry.dtype, entry.shape, entry.nbytes)
        header[entry.name] = {
            "dtype": tag,
            "shape": shape,
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(len(text) + 8) % HEADER_ALIGN)
    return Plan(entries, views, struct.pack("<Q", len(text)) + text, offset)
