"""Which of the writer's and reader's steps release the GIL: each step timed on one thread,
then the same calls split over two threads. A speed-up near 2 means the step runs in
parallel (it releases the GIL, and the machine has the two cores); near 1, it does not.

    python benchmarks/profiles/gil_release.py

Best of 5 for each; 64 calls on 1 MiB to 4 MiB buffers, so that thread start-up is noise,
and 1024 calls on cache-resident 256 KiB buffers where memory bandwidth could hide the
answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch
import xxhash
import zstandard
from codec_phases import best  # best of 5

from ckptstore import _codec


def speedup(name: str, work: Callable[[list], None], items: list) -> None:
    one = best(lambda: work(items))

    def two() -> None:
        threads = [threading.Thread(target=work, args=(items[i::2],)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    both = best(two)
    print(f"{name:44s} 1 thread {one * 1e3:6.1f} ms, 2 threads {both * 1e3:6.1f} ms: "
          f"{one / both:.2f}x")  # fmt: skip


def main() -> None:
    rng = np.random.default_rng(0)
    weights = [
        (torch.randn(1 << 20) * 0.05).view(torch.uint8).numpy().tobytes() for _ in range(64)
    ]  # 64 chunks of 4 MiB float32
    planes = [np.minimum(rng.geometric(0.2, 1 << 20), 255).astype(np.uint8) for _ in range(64)]
    cctx = zstandard.ZstdCompressor(compression_params=_codec._PLANE_PARAMS)
    frames = [cctx.compress(p.data) for p in planes]
    encoded = [_codec.encode_chunk(w, torch.float32, 3) for w in weights]
    sources = [torch.randn(1 << 20) for _ in range(64)]
    targets = [torch.empty(1 << 20) for _ in range(64)]
    outs = [memoryview(bytearray(len(w))) for w in weights]

    def compress(items: list) -> None:
        local = zstandard.ZstdCompressor(compression_params=_codec._PLANE_PARAMS)
        for p in items:
            local.compress(p.data)

    def decompress(items: list) -> None:
        local = zstandard.ZstdDecompressor()
        for f in items:
            local.decompress(f)

    speedup("zstd compress (plane settings), 1 MiB", compress, planes)
    speedup("zstd decompress, 1 MiB", decompress, frames)
    speedup(
        "xxh3_64 (python-xxhash), 4 MiB",
        lambda xs: [xxhash.xxh3_64_hexdigest(w) for w in xs],
        weights,
    )
    pairs = list(zip(targets, sources, strict=True))
    speedup(
        "torch copy_ into a staging tensor, 4 MiB", lambda xs: [t.copy_(s) for t, s in xs], pairs
    )
    speedup(
        "encode_chunk_parts (kernel + zstd), 4 MiB",
        lambda xs: [_codec.encode_chunk_parts(w, torch.float32, 3) for w in xs],
        weights,
    )
    # the same two on cache-resident buffers (256 KiB, used over and over): memory
    # bandwidth out of the picture, what is left is whether the call holds the GIL
    small = [torch.randn(1 << 16) for _ in range(2)]
    small_pairs = [(torch.empty(1 << 16), small[i % 2]) for i in range(2)] * 512
    speedup(
        "torch copy_, 256 KiB, cache-resident", lambda xs: [t.copy_(s) for t, s in xs], small_pairs
    )
    blobs = [s.view(torch.uint8).numpy().tobytes() for s in small] * 512
    speedup(
        "xxh3_64, 256 KiB, cache-resident",
        lambda xs: [xxhash.xxh3_64_hexdigest(b) for b in xs],
        blobs,
    )
    jobs = list(zip(encoded, outs, strict=True))
    speedup(
        "decode_chunk_into (zstd + kernel), 4 MiB",
        lambda xs: [_codec.decode_chunk_into(s, t, o) for (s, t), o in xs],
        jobs,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)  # copy_ on one intra-op thread: the question is the GIL
    main()
