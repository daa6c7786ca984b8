"""Training overhead: steps/s of a loop that checkpoints ÷ the same loop without.

The checkpoint interval is set from the measured commit time (at least twice it), so a
save is always committed before the next one starts and `save()` never waits for a slot.
The loop with checkpoints and the loop without run alternately, `repeat` times each.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

import torch

import ckptstore


def _setup(quick: bool) -> tuple[Any, Any, Any]:
    layers, width, batch = (4, 256, 32) if quick else (8, 1024, 256)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[m for _ in range(layers) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randn(batch, width)

    def step() -> None:
        model(data).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    return step, state, model


def overhead(quick: bool, threads: int, codec: str, repeat: int, scratch: str) -> dict:
    step, state, _ = _setup(quick)
    for _ in range(3):
        step()
    step_s = statistics.median(_time(step) for _ in range(5))
    run = os.path.join(scratch, f"train-{codec}")
    with ckptstore.CheckpointManager(run, codec=codec, keep_last=2, threads=threads) as m:
        commits = []
        for i in range(2):
            start = time.perf_counter()
            m.save(i, state()).wait()
            commits.append(time.perf_counter() - start)
        commit_s = max(commits)
        # at least 2x the commit time, and at least a second (fixed costs: fsyncs, retention)
        interval = max(2, math.ceil(max(2 * commit_s, 1.0) / step_s))
        steps = interval * (3 if quick else 4)
        ratios, with_, without = [], [], []
        for rep in range(repeat):
            base = steps / _time(lambda: [step() for _ in range(steps)])
            start = time.perf_counter()
            for i in range(1, steps + 1):
                step()
                if i % interval == 0 and i < steps:
                    m.save(10 + rep * steps + i, state())
            ckpt = steps / (time.perf_counter() - start)
            m.wait()
            ratios.append(ckpt / base)
            with_.append(ckpt)
            without.append(base)
    return {
        "ratio": statistics.median(ratios),
        "with": statistics.median(with_),
        "without": statistics.median(without),
        "interval_steps": interval,
        "step_s": step_s,
        "commit_s": commit_s,
        "steps": steps,
        "note": (
            f"every {interval} steps ({interval * step_s:.2f} s >= 2x commit {commit_s:.2f} s), "
            f"{steps} steps, writer threads={threads}"
        ),
    }


def _time(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
