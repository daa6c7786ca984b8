"""Whole-commit time for different early-writeback intervals, interleaved A/B.

    python benchmarks/profiles/writeback_ab.py b_minilm_bf16 32,8,4 10

Arguments: the state, the intervals in MiB, the repeats. Each repeat saves the state once
per interval (order reversed on odd repeats) with one Checkpointer (codec zstd, 2 writer
threads) and waits for the durable commit; prints the median per interval.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _states as st

import ckptstore
from ckptstore import _storage


def main(name: str, intervals: list[int], repeats: int) -> None:
    flat = st.build_states(False)[name]()
    scratch = tempfile.mkdtemp()
    checkpointer = ckptstore.Checkpointer(codec="zstd", threads=2)
    times: dict[int, list[float]] = {}
    try:
        for rep in range(repeats):
            for every in intervals if rep % 2 == 0 else intervals[::-1]:
                _storage.WRITEBACK_EVERY = every  # read at each write
                path = os.path.join(scratch, f"{rep}-{every}")
                start = time.perf_counter()
                checkpointer.save(path, flat).wait()
                times.setdefault(every, []).append(time.perf_counter() - start)
                shutil.rmtree(path)
    finally:
        checkpointer.close()
        shutil.rmtree(scratch, ignore_errors=True)
    for every, values in times.items():
        ms = sorted(round(v * 1e3) for v in values)
        print(f"{name} writeback every {every >> 20} MiB: median "
              f"{statistics.median(values) * 1e3:.1f} ms {ms}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], [int(v) << 20 for v in sys.argv[2].split(",")], int(sys.argv[3]))
