"""Is the RSS growth over many saves a leak? 300 saves of MiniLM fp32 through a
CheckpointManager (keep_last=2), with RSS and tracemalloc's count of live Python
allocations every 50 saves, and the five biggest differences between save 50 and 300.

    python benchmarks/profiles/rss_trace.py
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import tracemalloc

import psutil
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _states as st

import ckptstore


def main(saves: int = 300) -> None:
    state = st.minilm(torch.float32)
    scratch = tempfile.mkdtemp()
    process = psutil.Process()
    tracemalloc.start(8)
    try:
        run = os.path.join(scratch, "run")
        with ckptstore.CheckpointManager(run, codec="zstd", keep_last=2, threads=2) as manager:
            for step in range(saves):
                manager.save(step, state).wait()
                if step == 50:
                    gc.collect()
                    before = tracemalloc.take_snapshot()
                if step % 50 == 0 or step == saves - 1:
                    live = tracemalloc.get_traced_memory()[0]
                    print(f"save {step}: RSS {process.memory_info().rss / 1e6:.1f} MB, "
                          f"Python allocations {live / 1e6:.2f} MB")  # fmt: skip
            gc.collect()
            for diff in tracemalloc.take_snapshot().compare_to(before, "lineno")[:5]:
                print(diff)
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
