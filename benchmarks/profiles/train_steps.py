"""Step times of the benchmark's training loop around checkpoints, by torch thread count.

    python benchmarks/profiles/train_steps.py

The loop of `benchmarks/_train.py` (8 Linear 1024x1024, AdamW, batch 256), saving every
16 steps with one writer thread (zstd, then none), with torch on every core and on
cores - 1. Prints the mean step time without and with checkpoints, what each `save()`
blocked, and the step times right after one save: with torch on every core, the OpenMP
team waits for whichever of its threads the writer has preempted.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _train

import ckptstore

EVERY = 16


def run(codec: str, torch_threads: int) -> None:
    torch.set_num_threads(torch_threads)
    step, state, _, _ = _train._setup(False)
    for _ in range(3):
        step()
    with (
        tempfile.TemporaryDirectory() as scratch,
        ckptstore.CheckpointManager(
            os.path.join(scratch, "run"), codec=codec, keep_last=2, threads=1
        ) as manager,
    ):
        manager.save(0, state()).wait()
        base = []
        for _ in range(3 * EVERY):
            start = time.perf_counter()
            step()
            base.append(time.perf_counter() - start)
        steps, blocked = [], []
        for i in range(1, 4 * EVERY + 1):
            start = time.perf_counter()
            step()
            steps.append(time.perf_counter() - start)
            if i % EVERY == 0:
                start = time.perf_counter()
                manager.save(i, state())
                blocked.append(time.perf_counter() - start)
        manager.wait()
    after = " ".join(f"{s * 1e3:.0f}" for s in steps[EVERY : EVERY + 8])
    print(
        f"{codec:4s} torch threads {torch_threads}: step {statistics.mean(base) * 1e3:.1f} ms "
        f"without, {statistics.mean(steps) * 1e3:.1f} ms with checkpoints; save() blocked "
        f"{statistics.mean(blocked) * 1e3:.1f} ms; 8 steps after a save: {after} ms"
    )


if __name__ == "__main__":
    cores = os.cpu_count() or 1
    for threads in sorted({cores, max(1, cores - 1)}, reverse=True):
        for codec in ("zstd", "none"):
            run(codec, threads)
