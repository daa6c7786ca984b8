"""The compiled byte-grouping kernel against the numpy implementation.

The numpy functions in `_codec.py` are the reference: written as array expressions of
the format's definition, independently of the C loops. Both must write the same bytes
for every input, decode each other's output, and reject the same forged chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec import FLOAT_DTYPES, flip_each, float_chunks, weights

from ckptstore import _codec
from ckptstore._codec import CodecError, decode_chunk, encode_chunk

native = pytest.importorskip("ckptstore._grouping")


def with_backend(name: str, fn: Callable[[], Any]) -> Any:
    saved = _codec._native
    _codec._native = native if name == "native" else None
    try:
        return fn()
    finally:
        _codec._native = saved


def outcome(fn: Callable[[], Any]) -> Any:
    """The bytes a call returns, or the fact that it raised CodecError."""
    try:
        return bytes(fn())
    except CodecError:
        return CodecError


def encodings(raw: bytes, dtype: torch.dtype | None) -> tuple[tuple[bytes, str], ...]:
    return tuple(
        with_backend(name, lambda: tuple(map(_as_bytes, encode_chunk(raw, dtype, 3))))
        for name in ("numpy", "native")
    )


def _as_bytes(x: Any) -> Any:
    return x if isinstance(x, str) else bytes(x)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(float_chunks())
def test_same_bytes_from_both_for_any_chunk(chunk: tuple[bytes, torch.dtype]) -> None:
    raw, dtype = chunk
    by_numpy, by_native = encodings(raw, dtype)
    assert by_native == by_numpy
    stored, tag = by_native
    for name in ("numpy", "native"):
        assert with_backend(name, lambda: bytes(decode_chunk(stored, tag, len(raw)))) == raw


@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.complex64, torch.complex128])
@pytest.mark.parametrize("count", [1, 2, 3, 63, 64, 65, 4097, 100_001, 1 << 20])
def test_same_bytes_from_both_for_weights(dtype: torch.dtype, count: int) -> None:
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    source = dtype if dtype.is_floating_point else real
    raw = weights(count, source)
    by_numpy, by_native = encodings(raw, dtype)
    assert by_native == by_numpy
    if count >= 4097:  # (tiny chunks may be stored raw or as plain zstd)
        assert by_native[1].startswith("bg")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_same_bytes_for_every_16_bit_pattern(dtype: torch.dtype) -> None:
    # Every exponent occurs: escapes on every chunk, and float16's plain-vs-joint choice.
    raw = np.arange(1 << 16, dtype="<u2").tobytes()
    shuffled = np.random.default_rng(5).permutation(np.frombuffer(raw, "<u2")).tobytes()
    for data in (raw, shuffled):
        by_numpy, by_native = encodings(data, dtype)
        assert by_native == by_numpy


def test_escapes_are_exercised() -> None:
    # The weights above hold outliers (x1e4) that fall outside the exponent window; make
    # sure they reach the escape stream, so the tests above cover it.
    raw = weights(100_000, torch.float32)
    stored, tag = encode_chunk(raw, torch.float32, 3)
    assert tag == "bg4j2p"
    body = bytes(stored)  # [lo] [escape count] [five stream lengths] [streams]
    count = int.from_bytes(body[1:5], "little")
    escape_length = int.from_bytes(body[5 + 4 * 4 : 5 + 5 * 4], "little")
    # the count, from the IEEE layout: exponents outside the 63 starting at the window byte
    exponents = (np.frombuffer(raw, "<u4") >> 23) & 0xFF
    assert escape_length > 0 and count == np.count_nonzero((exponents - body[0]) % 256 >= 63)
    # a stored count that does not match plane A's escape codes is refused by both
    for wrong in (count - 1, count + 1, 0, 100_001):
        forged = body[:1] + wrong.to_bytes(4, "little") + body[5:]
        for name in ("numpy", "native"):
            assert (
                with_backend(name, lambda f=forged: outcome(lambda: decode_chunk(f, tag, len(raw))))
                is CodecError
            )


@pytest.mark.parametrize(
    ("dtype", "count"),
    [(d, 5_000) for d in FLOAT_DTYPES]
    # plane B bit-packed: tags bg4j2p, bg2j2p
    + [(torch.float32, 20_001), (torch.bfloat16, 40_001)],
)
def test_forged_chunks_fail_alike(dtype: torch.dtype, count: int) -> None:
    raw = weights(count, dtype)
    stored, tag = encode_chunk(raw, dtype, 3)
    assert tag.startswith("bg") and (count < 20_000 or tag.endswith("j2p"))
    for forged in flip_each(bytes(stored), 200):
        results = [
            with_backend(name, lambda f=forged: outcome(lambda: decode_chunk(f, tag, len(raw))))
            for name in ("numpy", "native")
        ]
        assert results[0] == results[1]


# ------------------------------------------------------------------ the kernel's own checks


def planes_of(values: np.ndarray, width: int, k: int, lo: int) -> tuple[Any, ...]:
    n = values.size
    a = np.empty(n, np.uint8)
    b = np.empty((n + 1) // 2 if k == 4 else n, np.uint8)
    rest = [np.empty(n, np.uint8) for _ in range(width - 2)]
    escapes = np.empty(n, np.uint8)
    count = native.split_joint(values.tobytes(), width, k, lo, a, b, rest, escapes)
    return a, b, rest, escapes[:count]


def test_split_joint_by_hand() -> None:
    # 1.0f = 0x3F800000, rotated left by one: 0x7F000000 -> top 0x7F, next 0x00.
    # -2.0f = 0xC0000000, rotated: 0x80000001 -> top 0x80, next 0x00, low byte 0x01.
    values = np.array([1.0, -2.0], "<f4")
    a, b, rest, escapes = planes_of(values, 4, 2, 0x7F)
    assert a.tolist() == [0 << 2, 1 << 2]  # codes top - lo: 0 and 1
    assert b.tolist() == [0, 0]
    assert [r.tolist() for r in rest] == [[0, 0], [0, 1]]
    assert escapes.size == 0
    # With the window at 0x00 both top bytes lie outside [0, 63): escaped, code 63.
    a, _, _, escapes = planes_of(values, 4, 2, 0x00)
    assert a.tolist() == [63 << 2, 63 << 2]
    assert escapes.tolist() == [0x7F, 0x80]


def test_merge_joint_rejects_wrong_escape_counts() -> None:
    values = np.array([1.0, -2.0, 3.0], "<f4")
    a, b, rest, escapes = planes_of(values, 4, 2, 0x00)
    assert escapes.size == 3
    out = bytearray(12)
    native.merge_joint(out, 4, 2, 0x00, a, b, rest, escapes)
    assert bytes(out) == values.tobytes()
    with pytest.raises(ValueError, match="need more"):
        native.merge_joint(out, 4, 2, 0x00, a, b, rest, escapes[:2])
    with pytest.raises(ValueError, match="escape stream holds 4 bytes"):
        native.merge_joint(out, 4, 2, 0x00, a, b, rest, np.append(escapes, np.uint8(1)))


def test_merge_joint_rejects_high_bits_in_plane_b() -> None:
    values = np.array([1.0, 2.0, 3.0], "<f4")
    a, b, rest, escapes = planes_of(values, 4, 2, 0x7F)
    b[1] |= 0x40
    with pytest.raises(ValueError, match="bits set above"):
        native.merge_joint(bytearray(12), 4, 2, 0x7F, a, b, rest, escapes)
    half = np.array([1.0, 2.0, 3.0], "<f4").astype(np.float16)
    a, b, rest, escapes = planes_of(half.view("<u2"), 2, 4, 0x1F)
    b[-1] |= 0x10  # the padding nibble of an odd count
    with pytest.raises(ValueError, match="padding nibble"):
        native.merge_joint(bytearray(6), 2, 4, 0x1F, a, b, rest, escapes)


def test_kernel_rejects_bad_shapes() -> None:
    n = 4
    a, b, esc = (np.empty(n, np.uint8) for _ in range(3))
    rest = [np.empty(n, np.uint8) for _ in range(2)]
    with pytest.raises(ValueError, match="width"):
        native.split_joint(bytes(3 * n), 3, 2, 0, a, b, [np.empty(n, np.uint8)], esc)
    with pytest.raises(ValueError, match="whole elements"):
        native.split_joint(bytes(4 * n + 1), 4, 2, 0, a, b, rest, esc)
    with pytest.raises(ValueError, match="do not match"):
        native.split_joint(bytes(4 * n), 4, 2, 0, a[:3], b, rest, esc)
    with pytest.raises(ValueError, match="rest plane"):
        native.split_joint(bytes(4 * n), 4, 2, 0, a, b, rest[:1], esc)
    with pytest.raises(TypeError):
        native.split_joint(bytes(4 * n), 4, 2, 0, bytes(n), b, rest, esc)  # read-only out
    with pytest.raises(ValueError, match="holds 3 bytes"):
        native.merge_planes(bytearray(4 * n), 4, [np.empty(n, np.uint8)] * 3 + [a[:3]])


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(t for t in _codec.KNOWN_TRANSFORMS if t.startswith("bg"))),
    st.integers(0, 300),
    st.binary(max_size=2000),
)
def test_arbitrary_stored_bytes_never_crash_the_kernel(tag: str, n: int, stored: bytes) -> None:
    # Forged input reaches the C loops only through length checks; whatever the bytes,
    # decoding returns exactly raw_len bytes or raises CodecError, as numpy does.
    raw_len = n * int(tag[2])
    results = [
        with_backend(name, lambda: outcome(lambda: decode_chunk(stored, tag, raw_len)))
        for name in ("numpy", "native")
    ]
    assert results[0] == results[1]
    assert results[1] is CodecError or len(results[1]) == raw_len


def test_forged_grouped_chunks_with_valid_frames_decode_alike() -> None:
    # Structured forgeries the random bytes above rarely hit: a valid table and valid zstd
    # frames, but planes swapped, escape stream dropped or padded, window byte moved.
    raw = weights(3_001, torch.bfloat16)
    stored, tag = encode_chunk(raw, torch.bfloat16, 3)
    assert tag == "bg2j2"  # 3001 values: too few for plane B to pass as uniform
    body = bytes(stored)
    lo, table = body[0], body[1:13]
    lengths = [int.from_bytes(table[i : i + 4], "little") for i in range(0, 12, 4)]
    streams, at = [], 13
    for length in lengths:
        streams.append(body[at : at + length])
        at += length

    def chunk(window: int, parts: list[bytes]) -> bytes:
        head = b"".join(len(p).to_bytes(4, "little") for p in parts)
        return bytes([window]) + head + b"".join(parts)

    forgeries = [
        chunk(lo, [streams[1], streams[0], streams[2]]),
        chunk(lo, [streams[0], streams[1], b""]),
        chunk(lo, [streams[0], streams[1], streams[2] + b"\x01"]),
        chunk((lo + 1) % 256, streams),
        chunk(lo, streams),  # the original, rebuilt: must decode to the raw bytes
    ]
    for forged in forgeries:
        results = [
            with_backend(name, lambda f=forged: outcome(lambda: decode_chunk(f, tag, len(raw))))
            for name in ("numpy", "native")
        ]
        assert results[0] == results[1]
    assert results[1] == raw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunks_written_as_bg2j4_still_decode(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2-byte floats were written with four joint bits (tag bg2j4) before they moved to two;
    # such checkpoints must keep loading. The encoder still takes k=4 when told to.
    monkeypatch.setitem(_codec._JOINT_BITS, 2, 4)
    raw = weights(50_001, dtype)
    by_numpy, by_native = encodings(raw, dtype)
    assert by_numpy == by_native and by_native[1] == "bg2j4"
    monkeypatch.undo()
    assert encode_chunk(raw, dtype, 3)[1].startswith("bg2j2")
    for name in ("numpy", "native"):
        assert (
            with_backend(name, lambda: bytes(decode_chunk(by_native[0], "bg2j4", len(raw)))) == raw
        )


def test_sampled_statistics_agree_with_the_reference_and_hand_worked_cases() -> None:
    # The encoder's choices rest on these; a difference between the backends would make
    # them write different bytes, so the entropy must agree to the last bit.
    rng = np.random.default_rng(11)
    planes = [
        rng.integers(0, 256, 1 << 17, dtype=np.uint8),  # noise
        rng.integers(0, 64, 1 << 17, dtype=np.uint8),  # uniform 6-bit
        np.minimum(rng.geometric(0.4, 100_003), 255).astype(np.uint8),  # skewed, odd size
        np.zeros(5, np.uint8),
        np.zeros(0, np.uint8),
    ]
    for plane in planes:
        by = [
            with_backend(name, lambda p=plane: _codec._sampled_bits(p))
            for name in ("numpy", "native")
        ]
        assert by[0] == by[1]
    cycle = np.repeat(np.arange(256, dtype=np.uint8), 16)  # every 16th byte: 0, 1, ..., 255
    assert with_backend("native", lambda: _codec._sampled_bits(cycle)) == 8.0
    halves = np.repeat(np.array([3, 7], np.uint8), 16 * 50)  # sampled: 50 threes, 50 sevens
    assert with_backend("native", lambda: _codec._sampled_bits(halves)) == 1.0
    # rotated top bytes: 1.0 and -1.0 -> 0x7F (the sign goes to the bottom), 2.0 -> 0x80
    values = np.array([1.0] * 16 + [-1.0] * 16 + [2.0] * 17, "<f4")
    for name in ("numpy", "native"):
        hist = with_backend(name, lambda: _codec._top_histogram(memoryview(values.tobytes()), 4))
        assert hist.sum() == 4 and hist[0x7F] == 2 and hist[0x80] == 2
    for dtype in FLOAT_DTYPES:
        raw = memoryview(weights(70_001, dtype))
        width = torch.empty(0, dtype=dtype).element_size()
        by = [
            with_backend(n, lambda r=raw, w=width: _codec._top_histogram(r, w))
            for n in ("numpy", "native")
        ]
        assert by[0].tolist() == by[1].tolist()


@pytest.mark.parametrize("width", [2, 4])
def test_packed_merge_matches_the_reference_at_every_length(width: int) -> None:
    # bg2j2p and bg4j2p chunks built by hand (plane A, the other planes and the escapes
    # raw, plane B packed) with random codes, some of them escapes: the kernel's fused
    # 32-element steps, its scalar tail and the hand-over between them must decode as
    # numpy does, and both must refuse a set padding bit.
    rng = np.random.default_rng(12)
    tag = f"bg{width}j2p"
    for n in [*range(0, 140), 1001, 4099]:
        a = rng.integers(0, 256, n, dtype=np.uint8)
        a[rng.random(n) < 0.9] &= 0xF3  # mostly inside the window; code 63 is 0xFC-0xFF
        escapes = rng.integers(0, 256, int(np.count_nonzero(a >= 0xFC)), dtype=np.uint8)
        b = _codec._pack6(rng.integers(0, 64, n, dtype=np.uint8)).tobytes()
        rest = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for _ in range(width - 2)]
        lo = int(rng.integers(0, 256))
        streams = [a.tobytes(), b, *rest, escapes.tobytes()]
        head = bytes([lo]) + escapes.size.to_bytes(4, "little")
        table = b"".join(len(s).to_bytes(4, "little") for s in streams)
        chunk = head + table + b"".join(streams)
        results = [
            with_backend(
                name, lambda c=chunk, k=n: outcome(lambda: decode_chunk(c, tag, width * k))
            )
            for name in ("numpy", "native")
        ]
        assert results[0] == results[1] and results[1] is not CodecError
        if n % 4:  # set a padding bit of the last partial group: refused by both
            forged = bytearray(chunk)
            forged[len(head) + len(table) + n + len(b) - 1] |= 0x80
            for name in ("numpy", "native"):
                got = with_backend(
                    name,
                    lambda f=bytes(forged), k=n: outcome(lambda: decode_chunk(f, tag, width * k)),
                )
                assert got is CodecError
