#!/usr/bin/env python3
"""The prepared check for a machine with a CUDA GPU (CI has none).

    python tools/cuda_check.py            # tests/test_cuda.py, then a stall timing

Runs the CUDA tests (pinned staging, copies ordered on the caller's stream, map_location)
and times how long `save()` blocks for a GPU-resident state against a plain
device-to-host copy of the same tensors into pinned memory. Prints one line per figure.
"""

from __future__ import annotations

import sys
import tempfile
import time

import pytest
import torch

import ckptstore


def _stall(state: dict[str, torch.Tensor], repeats: int = 5) -> tuple[float, float]:
    tensors = list(state.values())
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    copy_times, save_times = [], []
    with tempfile.TemporaryDirectory() as run, ckptstore.CheckpointManager(run, keep_last=1) as m:
        for step in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for dst, src in zip(pinned, tensors, strict=True):
                dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            copy_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            m.save(step, state)
            save_times.append(time.perf_counter() - start)
            m.wait()
    return min(copy_times[1:]), min(save_times[1:])


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    status = pytest.main(["-q", "tests/test_cuda.py"])
    gen = torch.Generator(device="cuda").manual_seed(0)
    state = {f"w{i}": torch.randn(2048, 2048, device="cuda", generator=gen) for i in range(48)}
    copy, save = _stall(state)
    print(
        f"device-to-host pinned copy {copy * 1e3:.1f} ms; save() blocked {save * 1e3:.1f} ms;"
        f" ratio {save / copy:.2f} (target <= 1.5)"
    )
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
