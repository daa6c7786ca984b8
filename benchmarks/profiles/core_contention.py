"""What one busy core costs the training loop on the other core, with no checkpointing.

    python benchmarks/profiles/core_contention.py

The training loop of `benchmarks/_train.py` on one torch thread, alone, then beside a
thread that keeps the other core busy: compressing a 32 KiB buffer (cache-resident
compute) or copying 100 MB (memory streaming); both release the GIL. The difference is the
floor of any background writer's cost to training on this machine, whatever it does.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
import zstandard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _train

STEPS = 24


def main() -> None:
    torch.set_num_threads(1)
    step, _, _, _ = _train._setup(False)
    for _ in range(3):
        step()
    small = os.urandom(32 << 10)
    big = np.ones(25_000_000, np.float32)
    cctx = zstandard.ZstdCompressor(level=3)
    stop = threading.Event()
    loads: dict[str, Callable[[], object] | None] = {
        "alone": None,
        "beside compute": lambda: cctx.compress(small),
        "beside memory copy": big.copy,
    }

    def spin(work: Callable[[], object]) -> None:
        while not stop.is_set():
            work()

    for rep in range(2):
        for name, work in loads.items():
            stop.clear()
            thread = threading.Thread(target=spin, args=(work,), daemon=True) if work else None
            if thread:
                thread.start()
            start = time.perf_counter()
            for _ in range(STEPS):
                step()
            rate = STEPS / (time.perf_counter() - start)
            stop.set()
            if thread:
                thread.join()
            print(f"round {rep + 1}: {name:18s} {rate:.2f} steps/s")


if __name__ == "__main__":
    main()
