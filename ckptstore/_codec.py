"""Chunk codec: byte grouping of floats plus zstd, one chunk at a time.

The format module cuts the safetensors payload into chunks (the header, or bytes of one
tensor, at most a few MiB, a whole number of elements) and calls :func:`encode_chunk` on
each from several threads. Every chunk is encoded on its own, so chunks compress on all
cores and one tensor decodes without its neighbours. :func:`encode_chunk` returns the
stored bytes and a *transform tag*; the tag goes into the manifest and, together with the
raw length, says everything :func:`decode_chunk` needs.

Tags
----
``raw``
    The stored bytes are the raw bytes (nothing shrank).
``zstd``
    One zstd frame. Used for the header, integers, bools, 1-byte floats (float8) and
    anything else that is not a 2, 4 or 8 byte float.
``bg2``, ``bg4``, ``bg8``
    Byte grouping of 2/4/8-byte little-endian floats. Each element is rotated left by one
    bit, which moves the sign from the top bit to the bottom one, so that the top byte of a
    bfloat16/float32 value is exactly its exponent (for float16 it is the 5-bit exponent
    and 3 mantissa bits; for float64 the top 8 of 11 exponent bits). The rotated elements
    are split into byte planes, most significant first, and each plane is stored as one
    zstd frame, or raw when the frame would not be smaller.
``bg2j2``, ``bg4j2``, ``bg8j2`` (and ``bg2j4``, read only)
    As ``bgN``, but the two top planes are recoded before zstd (``jK``: K mantissa bits
    go with the exponent). The top byte (exponent) of trained weights takes few values in
    a narrow window: ``code = top - lo`` for a window of ``2**(8-K) - 1`` values starting
    at ``lo``, the next code marking an escape whose top byte is kept in a separate
    stream. Plane A is ``code << K | (next byte >> (8-K))``; plane B holds the low
    ``8-K`` bits of the next byte, one per byte for K=2 and two per byte (nibbles) for
    K=4. Why: zstd codes literals with Huffman, which spends a whole number of bits per
    symbol; the exponent alone (about 2.6 bits of entropy) loses a few percent to that
    rounding, and the top mantissa byte (about 7.97 bits per byte) cannot shrink at all.
    Coding the exponent jointly with the top mantissa bits captures their skew and their
    dependence on the exponent, and the remaining bits cost exactly their width (Huffman
    on a uniform 64-symbol plane, or plain packing for nibbles). On all-MiniLM-L6-v2 this
    takes the ratio below ZipNN's (bfloat16 0.661 vs 0.665, float32 0.818 vs 0.819).
    All widths are written with K=2; 2-byte floats were written with K=4 (plane B two
    nibbles a byte) before plane B could be bit-packed, and such chunks still decode.
    float16, whose top byte already mixes exponent and mantissa, falls back to ``bg2``
    when its top bytes do not fit a window.
``bg2j2p``, ``bg4j2p``, ``bg8j2p``
    As the ``j2`` tags, but plane B (6-bit values) is stored bit-packed, four values
    to three bytes (``v0 | v1 << 6 | v2 << 12 | v3 << 18``, little endian; a last partial
    group keeps the bytes its bits reach, padding bits zero), never as a zstd frame. Used
    when a sample of plane B is as good as uniform (the low mantissa bits of trained
    weights): Huffman saves nothing there, and decoding it took as long as decoding
    plane A (float32 MiniLM: 35 of 68 ms in zstd). The plain ``j2`` tags remain for
    skewed planes B (constant or freshly initialised tensors), where zstd still pays.

Plane parameters: the exponent-like planes are compressed with match finding made minimal
(largest minimum match, smallest hash/chain/search logs) and 128 KiB blocks, so zstd
spends its effort on the entropy coder; matches hardly occur in float planes and the
match finder's literals-vs-match choices make the exponent plane larger (level 3 is 25%
worse than order-0). The same settings are used for the mantissa planes, where zstd falls
back to raw blocks quickly. The ``level`` argument applies to ``zstd`` chunks only.

Layout of a ``bg`` chunk: ``[lo: u8, j-variants only] [u32 LE escape count, p variants
only] [u32 LE stored length per stream] [streams...]``. (The count saves the reader a pass
over plane A to find out how long the escape stream decodes; it must match the escape
codes in plane A exactly.) Streams: the planes (A, B for ``j`` variants), then the escape stream for
``j`` variants. A stream whose stored length equals its raw length is raw; any other is
one zstd frame with content size (and no frame checksum since the p tags came in: older
frames carry one, and it is checked), which must be shorter than the raw length. Streams
and the window byte carry no checksum of their own here: the manifest's checksums
of stored chunks and raw bytes are what detect those flips. Decoding never allocates
more than the raw length per buffer and rejects frames that claim another size, so a
forged chunk fails with :class:`CodecError`.

Thread safety: zstd compressor and decompressor objects are not thread-safe, so each
thread keeps its own in a :class:`threading.local`. zstd, the compiled kernel and the
large numpy operations release the GIL.

Two implementations of the byte grouping: the compiled kernel in ``_grouping.c`` (one pass
per chunk) and the numpy functions below (a dozen passes per chunk). They write identical
bytes; the tests hold them to that.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from types import ModuleType
from typing import Any, Final

import numpy as np
import torch
import zstandard

from ._workers import ThreadScratch
from .errors import CkptError


def _load_native() -> ModuleType | None:
    """The compiled byte-grouping kernel (`_grouping.c`), unless absent or turned off.

    `CKPTSTORE_CODEC_BACKEND=numpy` selects the numpy implementation, which writes the
    same bytes more slowly (it is the reference the tests compare the kernel against).
    """
    if os.environ.get("CKPTSTORE_CODEC_BACKEND", "").lower() == "numpy":
        return None
    try:
        from . import _grouping
    except ImportError:  # not compiled (no C compiler at install time) or not this host
        return None
    return _grouping


_native = _load_native()


def backend() -> str:
    """Which byte-grouping implementation is in use: ``"native"`` or ``"numpy"``."""
    return "numpy" if _native is None else "native"


__all__ = [
    "KNOWN_TRANSFORMS",
    "CodecError",
    "backend",
    "decode_chunk",
    "decode_chunk_into",
    "encode_chunk",
    "encode_chunk_parts",
]


class CodecError(CkptError, ValueError):
    """Raised when a stored chunk cannot be decoded: unknown tag, wrong length, bad frame.

    The chunk is corrupt or was forged; re-read it from storage or restore an older
    checkpoint.
    """


# Mantissa bits the encoder codes together with the exponent, per element width. 2-byte
# floats took 4 until the packed plane B came (tag bg2j4, still decoded): with 2, plane A
# has fewer symbols (4.6 instead of 6.6 bits of entropy on bf16 MiniLM), which zstd's
# Huffman decoder runs through 1.6x as fast, the wider window (63 exponents, not 15)
# escapes less, and plane B packs to 6 bits: bf16 MiniLM 0.6611 instead of 0.6627.
_JOINT_BITS: Final = {2: 2, 4: 2, 8: 2}
_SAMPLE_STRIDE: Final = 16  # the exponent window is chosen from every 16th element
_MIN_GROUPED: Final = 64  # fewer elements than this: also try plain zstd, keep the smaller
_U32 = struct.Struct("<I")
_MIN_SAMPLED: Final = 1 << 16  # planes shorter than this always go through zstd
_NOISE_BITS: Final = 7.985  # sampled bits per byte at which a plane is stored raw

_FLOAT_WIDTH: Final[dict[torch.dtype, int]] = {
    torch.float16: 2,
    torch.bfloat16: 2,
    torch.complex32: 2,
    torch.float32: 4,
    torch.complex64: 4,
    torch.float64: 8,
    torch.complex128: 8,
}
_UINT: Final[dict[int, np.dtype[Any]]] = {
    2: np.dtype("<u2"),
    4: np.dtype("<u4"),
    8: np.dtype("<u8"),
}

KNOWN_TRANSFORMS: frozenset[str] = frozenset(
    ["raw", "zstd", "bg2j4"]  # bg2j4: written before 2-byte floats moved to 2 joint bits
    + [f"bg{w}" for w in (2, 4, 8)]
    + [f"bg{w}j{k}" for w, k in _JOINT_BITS.items()]
    + [f"bg{w}j{k}p" for w, k in _JOINT_BITS.items() if k == 2]
)
# Sampled bits per value at or above which a 6-bit plane B is stored packed: Huffman could
# save at most 0.8% of the plane (0.2% of a float32 chunk) there, and costs a decode pass.
_UNIFORM6_BITS: Final = 5.95

# Minimal match finding: zstd becomes (almost) a per-block Huffman coder.
_PLANE_PARAMS: Final = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_FAST,
    min_match=zstandard.MINMATCH_MAX,
    hash_log=zstandard.HASHLOG_MIN,
    chain_log=zstandard.CHAINLOG_MIN,
    search_log=zstandard.SEARCHLOG_MIN,
    window_log=17,
    target_length=0,
    # No frame checksum: the stored chunk's xxh3 is checked before decoding and the raw
    # bytes' after; zstd's own xxh64 over every plane was a third pass (8% of its time).
    write_checksum=False,
    write_content_size=True,
)


class _ThreadState(threading.local):
    """Per-thread zstd contexts (zstandard objects must not be shared between threads)."""

    def __init__(self) -> None:
        self.plane = zstandard.ZstdCompressor(compression_params=_PLANE_PARAMS)
        self.by_level: dict[int, zstandard.ZstdCompressor] = {}
        self.dctx = zstandard.ZstdDecompressor()

    def leveled(self, level: int) -> zstandard.ZstdCompressor:
        cctx = self.by_level.get(level)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
            self.by_level[level] = cctx
        return cctx


_local = _ThreadState()
# Unpacked planes B where the kernel does not merge them as it unpacks (float64, and the
# numpy path): a fresh array per chunk was 5,000 page faults per decode of MiniLM.
_unpacked = ThreadScratch()


# --------------------------------------------------------------------------- encoding


def encode_chunk(
    raw: memoryview | bytes, dtype: torch.dtype | None, level: int = 3
) -> tuple[bytes | memoryview, str]:
    """Encode one chunk; return ``(stored, tag)``.

    ``dtype`` is the element type of the tensor the chunk belongs to, or None for opaque
    bytes (the safetensors header). ``level`` is the zstd level for non-float data. A chunk
    that does not shrink comes back unchanged with tag ``raw``.
    """
    parts, tag = encode_chunk_parts(raw, dtype, level)
    return (parts[0] if len(parts) == 1 else b"".join(parts)), tag


def encode_chunk_parts(
    raw: memoryview | bytes, dtype: torch.dtype | None, level: int = 3
) -> tuple[list[bytes | memoryview], str]:
    """As :func:`encode_chunk`, with the stored bytes as consecutive parts, not joined.

    The writer writes and hashes the parts one after the other: joining them copied every
    stored chunk once more, under the GIL (a quarter of float32 encoding time).
    """
    view = memoryview(raw).cast("B")
    width = _FLOAT_WIDTH.get(dtype) if dtype is not None else None
    parts: list[bytes | memoryview]
    if width is None or len(view) % width or len(view) == 0:
        parts, tag = [_encode_zstd(view, level)], "zstd"
    else:
        parts, tag = _encode_grouped(view, width)
        if len(view) // width < _MIN_GROUPED:
            plain = _encode_zstd(view, level)
            if len(plain) < _total(parts):
                parts, tag = [plain], "zstd"
    if _total(parts) >= len(view):
        return [raw], "raw"
    return parts, tag


def _total(parts: list[bytes | memoryview]) -> int:
    return sum(memoryview(p).nbytes for p in parts)


def _encode_zstd(view: memoryview, level: int) -> bytes:
    return _local.leveled(level).compress(view)


def _frame_or_raw(plane: np.ndarray) -> bytes | memoryview:
    """One stream: a zstd frame if it is smaller than the plane, else the plane itself."""
    data = np.ascontiguousarray(plane).data.cast("B")
    if _incompressible(plane):
        return data
    frame = _local.plane.compress(data)
    return frame if len(frame) < len(data) else data


def _sampled_bits(plane: np.ndarray) -> float:
    """Order-0 entropy, in bits per byte, of every 16th byte of the plane.

    Summed in value order, one rounding per step, as the kernel sums it: the two backends
    must take the same decisions to write the same bytes.
    """
    if _native is not None:
        return float(_native.sampled_bits(np.ascontiguousarray(plane), _SAMPLE_STRIDE))
    hist = np.bincount(plane[::_SAMPLE_STRIDE], minlength=256).tolist()
    total, bits = sum(hist), 0.0
    for count in hist:
        if count:
            q = count / total
            bits -= q * math.log2(q)
    return bits


def _incompressible(plane: np.ndarray) -> bool:
    """Whether a sample of the plane has the byte entropy of noise (low mantissa bytes).

    zstd would find that out itself, after building Huffman tables for every block: that
    was a third of the encoding time of float32 chunks. The order-0 entropy of every 16th
    byte is the bound on what zstd's Huffman stage can save on these planes (they hold no
    matches); at or above `_NOISE_BITS` the frame would save under 0.2%, which its block
    headers and tables eat, so the plane is stored raw without asking zstd.
    """
    return plane.size >= _MIN_SAMPLED and _sampled_bits(plane) >= _NOISE_BITS


def _packed6_size(n: int) -> int:
    return (6 * n + 7) // 8


def _pack6(values: np.ndarray) -> np.ndarray:
    """Bit-pack 6-bit values, four to three bytes (layout in the module docstring)."""
    packed = np.empty(_packed6_size(values.size), np.uint8)
    if _native is not None:
        _native.pack6(np.ascontiguousarray(values), packed)
        return packed
    padded = np.zeros(-(-values.size // 4) * 4, np.uint32)
    padded[: values.size] = values & np.uint8(63)
    groups = padded.reshape(-1, 4)
    words = groups[:, 0] | groups[:, 1] << 6 | groups[:, 2] << 12 | groups[:, 3] << 18
    packed[:] = words.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].reshape(-1)[: packed.size]
    return packed


def _check_packed_size(packed: memoryview | bytes, n: int) -> None:
    if len(packed) != _packed6_size(n):
        raise CodecError(
            f"packed plane B holds {len(packed)} bytes, {n} values take {_packed6_size(n)}"
        )


def _unpack6(packed: memoryview | bytes, n: int, into: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`_pack6`; raise :class:`CodecError` on a wrong size or padding.

    ``into``: n bytes to unpack into (the kernel path), instead of a new array.
    """
    _check_packed_size(packed, n)
    values = np.empty(n, np.uint8) if into is None else into
    if _native is not None:
        try:
            _native.unpack6(packed, values)
        except ValueError as error:
            raise CodecError(str(error)) from None
        return values
    groups = np.zeros(-(-n // 4) * 3, np.uint8)
    groups[: len(packed)] = np.frombuffer(packed, np.uint8)
    b = groups.reshape(-1, 3).astype(np.uint32)
    words = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16
    flat = np.stack([(words >> (6 * j)) & np.uint32(63) for j in range(4)], axis=1).reshape(-1)
    if flat[n:].any():  # the values past n cover exactly the padding bits
        raise CodecError("packed plane B has non-zero padding bits")
    values[:] = flat[:n]
    return values


def _rotated_planes(view: memoryview, width: int) -> np.ndarray:
    """numpy: rotate each element left by one bit; its byte planes, (width, n), LSB first."""
    words = np.frombuffer(view, dtype=_UINT[width])
    rotated = words * words.dtype.type(2)  # u8/u16 left shifts are slow in numpy; multiply
    rotated |= words >> words.dtype.type(8 * width - 1)
    return rotated.view(np.uint8).reshape(-1, width).T.copy()


def _top_histogram(view: memoryview, width: int) -> np.ndarray:
    """Counts of the top byte of every 16th rotated element (256 int64): what the exponent
    window is chosen from."""
    if _native is not None:
        counts = np.empty(256, np.int64)
        _native.top_histogram(view, width, _SAMPLE_STRIDE, counts)
        return counts
    words = np.frombuffer(view, dtype=_UINT[width])[::_SAMPLE_STRIDE]
    rotated = words * words.dtype.type(2)
    rotated |= words >> words.dtype.type(8 * width - 1)
    top = (rotated >> words.dtype.type(8 * width - 8)).astype(np.uint8)
    return np.bincount(top, minlength=256).astype(np.int64)


def _choose_window(hist: np.ndarray, window: int) -> tuple[int, int]:
    """(start of the ``window`` values, mod 256, holding most sampled top bytes; how many
    sampled top bytes fall outside it)."""
    cum = np.concatenate(([0], np.cumsum(np.concatenate((hist, hist)))))
    inside = cum[window : window + 256] - cum[:256]
    lo = int(np.argmax(inside))
    return lo, int(cum[256] - inside[lo])


def _split_planes(view: memoryview, width: int) -> list[np.ndarray]:
    """The rotated byte planes, most significant first."""
    if _native is None:
        return list(_rotated_planes(view, width)[::-1])
    n = len(view) // width
    planes = [np.empty(n, np.uint8) for _ in range(width)]
    _native.split_planes(view, width, planes)
    return planes


def _split_joint(
    view: memoryview, width: int, k: int, lo: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """Plane A, plane B (nibble-packed for k=4), the other planes, the escaped top bytes."""
    n = len(view) // width
    if _native is None:
        planes = _rotated_planes(view, width)[::-1]
        escapes, plane_a, plane_b = _joint_planes(planes[0], planes[1], k, lo)
        return plane_a, plane_b, list(planes[2:]), escapes
    plane_a = np.empty(n, np.uint8)
    plane_b = np.empty((n + 1) // 2 if k == 4 else n, np.uint8)
    rest = [np.empty(n, np.uint8) for _ in range(width - 2)]
    escapes = np.empty(n, np.uint8)
    count = _native.split_joint(view, width, k, lo, plane_a, plane_b, rest, escapes)
    return plane_a, plane_b, rest, escapes[:count]


def _joint_planes(
    top: np.ndarray, nxt: np.ndarray, k: int, lo: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy: recode the top two planes in place; (escaped top bytes, plane A, plane B)."""
    window = (1 << (8 - k)) - 1  # codes 0..window-1 are top - lo; code ``window`` escapes
    escapes = np.empty(0, np.uint8)
    top -= np.uint8(lo)
    if top.size and top.max() >= window:
        outside = np.flatnonzero(top >= window)
        escapes = top[outside] + np.uint8(lo)
        top[outside] = window
    top *= np.uint8(1 << k)  # u8 left shifts are slow in numpy; multiply
    top |= nxt >> np.uint8(8 - k)
    nxt &= np.uint8((1 << (8 - k)) - 1)
    return escapes, top, _pack_nibbles(nxt) if k == 4 else nxt


def _pack_nibbles(low: np.ndarray) -> np.ndarray:
    """Two 4-bit values to a byte, the first in the low half."""
    pairs = np.frombuffer(np.append(low, np.uint8(0)) if low.size % 2 else low, "<u2")
    return (pairs | (pairs >> np.uint16(4))).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    if n % 2 and packed[-1] >> 4:
        raise CodecError("nibble plane has a non-zero padding nibble")
    pairs = packed.astype("<u2")
    pairs |= pairs * np.uint16(16)
    pairs &= np.uint16(0x0F0F)
    return pairs.view(np.uint8)[:n]


def _encode_grouped(view: memoryview, width: int) -> tuple[list[bytes | memoryview], str]:
    """Byte-grouped encoding of a float chunk; the joint variant unless plain is smaller."""
    k = _JOINT_BITS[width]
    window = (1 << (8 - k)) - 1
    hist = _top_histogram(view, width)
    lo, outside = _choose_window(hist, window)
    plain = None
    # more than 1/64 of the sample escapes, e.g. float16: its top byte has mantissa bits
    if outside * 64 > int(hist.sum()):
        plain = _pack([_frame_or_raw(p) for p in _split_planes(view, width)])
    plane_a, plane_b, rest, escapes = _split_joint(view, width, k, lo)
    packed = k == 2 and _sampled_bits(plane_b) >= _UNIFORM6_BITS
    stream_b = _pack6(plane_b).data if packed else _frame_or_raw(plane_b)
    streams = [_frame_or_raw(plane_a), stream_b, *map(_frame_or_raw, rest), _frame_or_raw(escapes)]
    joint = _pack(streams, bytes([lo]) + (_U32.pack(escapes.size) if packed else b""))
    if plain is not None and _total(plain) <= _total(joint):
        return plain, f"bg{width}"
    return joint, f"bg{width}j{k}{'p' if packed else ''}"


def _pack(streams: list[bytes | memoryview], prefix: bytes = b"") -> list[bytes | memoryview]:
    """The chunk's parts: the prefix and length table, then the streams."""
    lengths = b"".join(_U32.pack(memoryview(s).nbytes) for s in streams)
    return [prefix + lengths, *streams]


# --------------------------------------------------------------------------- decoding


def decode_chunk(
    stored: memoryview | bytes, transform: str, raw_len: int
) -> bytes | bytearray | memoryview:
    """Decode one chunk to exactly ``raw_len`` bytes; raise :class:`CodecError` if corrupt."""
    if transform == "raw":
        _check_raw(stored, raw_len)
        return stored
    if transform == "zstd":
        return _unframe(memoryview(stored).cast("B"), raw_len, "chunk")
    out = bytearray(raw_len)
    decode_chunk_into(stored, transform, memoryview(out))
    return out


def decode_chunk_into(stored: memoryview | bytes, transform: str, out: memoryview) -> None:
    """Decode one chunk into ``out``, a writable buffer of exactly the raw length."""
    out = memoryview(out).cast("B")
    src = memoryview(stored).cast("B")
    if transform == "raw":
        _check_raw(src, len(out))
        out[:] = src
    elif transform == "zstd":
        out[:] = _unframe(src, len(out), "chunk")
    elif transform in KNOWN_TRANSFORMS:
        width, k = int(transform[2]), int(transform[4:].rstrip("p") or 0)
        if len(out) % width:
            raise CodecError(
                f"raw length {len(out)} is not a multiple of the element size {width} "
                f"of transform {transform!r}"
            )
        _decode_grouped(src, width, k, out, packed=transform.endswith("p"))
    else:
        raise CodecError(
            f"unknown transform {transform!r}; known: {sorted(KNOWN_TRANSFORMS)} "
            "(written by a newer ckptstore?)"
        )


def _check_raw(stored: memoryview | bytes, raw_len: int) -> None:
    if len(stored) != raw_len:
        raise CodecError(f"raw chunk holds {len(stored)} bytes, manifest says {raw_len}")


def _unframe(stream: memoryview, size: int, what: str) -> bytes | memoryview:
    """Decode one stream of ``size`` raw bytes: raw if the lengths match, else a frame."""
    if len(stream) == size:
        return stream
    if len(stream) > size:
        raise CodecError(f"{what}: {len(stream)} stored bytes for {size} raw bytes")
    try:
        claimed = zstandard.frame_content_size(stream)
        if claimed != size:
            raise CodecError(f"{what}: zstd frame claims {claimed} bytes, expected {size}")
        data = _local.dctx.decompress(stream, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: corrupt zstd frame ({exc})") from exc
    if len(data) != size:
        raise CodecError(f"{what}: zstd frame gave {len(data)} bytes, expected {size}")
    return data


def _split_streams(src: memoryview, count: int) -> list[memoryview]:
    """Cut the body after the length table into ``count`` streams; check the total."""
    table = count * _U32.size
    if len(src) < table:
        raise CodecError(f"grouped chunk of {len(src)} bytes is shorter than its table")
    lengths = [_U32.unpack_from(src, i * _U32.size)[0] for i in range(count)]
    if table + sum(lengths) != len(src):
        raise CodecError(
            f"grouped chunk holds {len(src)} bytes but its table adds up to {table + sum(lengths)}"
        )
    streams, pos = [], table
    for length in lengths:
        streams.append(src[pos : pos + length])
        pos += length
    return streams


def _decode_grouped(
    src: memoryview, width: int, k: int, out: memoryview, packed: bool = False
) -> None:
    """Decode a ``bg`` chunk; ``k`` is the joint bit count, 0 for plain byte grouping;
    ``packed``: plane B is bit-packed (the ``p`` tags)."""
    n = len(out) // width
    lo, escape_count = 0, None
    if k:
        if len(src) < 1:
            raise CodecError("grouped chunk is empty")
        lo, src = src[0], src[1:]
    if packed:
        if len(src) < _U32.size:
            raise CodecError("packed grouped chunk is shorter than its escape count")
        escape_count, src = _U32.unpack_from(src)[0], src[_U32.size :]
        if escape_count > n:
            raise CodecError(f"escape count {escape_count} exceeds the {n} elements")
    streams = _split_streams(src, width + 1 if k else width)
    sizes = [n, (n + 1) // 2 if k == 4 else n] + [n] * (width - 2)
    data: list[Any] = [
        _unframe(stream, size, f"plane {i}")
        for i, (stream, size) in enumerate(zip(streams, sizes, strict=False))
        if not (packed and i == 1)
    ]
    # bg2j2p, bg4j2p: the kernel merges the packed plane B as it unpacks it
    fused = packed and width <= 4 and _native is not None
    if fused:
        _check_packed_size(streams[1], n)
        data.insert(1, streams[1])
    elif packed:  # the scratch buffer is safe: merged below, before this thread decodes again
        data.insert(1, _unpack6(streams[1], n, np.frombuffer(_unpacked.view(n), np.uint8)))
    if _native is not None:
        try:
            if k:
                # merge_joint checks that the codes in plane A match the count one for one
                count = _native.count_escapes(data[0], k) if escape_count is None else escape_count
                escapes = _unframe(streams[width], count, "escape stream")
                _native.merge_joint(out, width, k, lo, data[0], data[1], data[2:], escapes, fused)
            else:
                _native.merge_planes(out, width, data)
        except ValueError as error:
            raise CodecError(str(error)) from None
        return
    planes = [np.frombuffer(d, np.uint8) for d in data]
    if k:
        plane_b = _unpack_nibbles(planes[1], n) if k == 4 else planes[1]
        planes[0], planes[1] = _unjoin_planes(
            planes[0], plane_b, lo, k, streams[width], escape_count
        )

    grouped = np.frombuffer(out, dtype=np.uint8).reshape(n, width)
    for j, plane in enumerate(planes):  # most significant first
        grouped[:, width - 1 - j] = plane
    words = np.frombuffer(out, dtype=_UINT[width])
    sign = words & words.dtype.type(1)
    words >>= words.dtype.type(1)
    sign *= words.dtype.type(1 << (8 * width - 1))
    words |= sign


def _unjoin_planes(
    plane_a: np.ndarray,
    plane_b: np.ndarray,
    lo: int,
    k: int,
    escape_stream: memoryview,
    escape_count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """numpy, inverse of :func:`_joint_planes`: return the top and next byte planes.

    ``escape_count``: the count a p-variant chunk stores, which must match plane A."""
    window = (1 << (8 - k)) - 1
    if plane_b.size and int(plane_b.max()) >> (8 - k):
        raise CodecError("plane B has bits set above its width")
    top = plane_a >> np.uint8(k)
    nxt = plane_a * np.uint8(1 << (8 - k))  # the low k bits of A to the top, wrapping
    nxt |= plane_b
    escaped = None
    if top.size and top.max() == window:
        escaped = np.flatnonzero(top == window)
    found = 0 if escaped is None else escaped.size
    if escape_count is not None and escape_count != found:
        raise CodecError(f"chunk counts {escape_count} escapes, plane A codes {found}")
    escapes = _unframe(escape_stream, found, "escape stream")
    top += np.uint8(lo)
    if escaped is not None:
        top[escaped] = np.frombuffer(escapes, np.uint8)
    return top, nxt
