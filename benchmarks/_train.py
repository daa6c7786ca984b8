"""Training overhead: steps/s of a loop that checkpoints ÷ the same loop without.

The checkpoint interval is set from the measured commit time (at least twice it), so a
save is always committed before the next one starts and `save()` never waits for a slot.
The loop with checkpoints and the loop without run alternately, `repeat` times each.

`torch_threads` is the training loop's intra-op thread count, the same in both loops. On a
CPU-bound trainer it decides the figure: torch's OpenMP team needs all of its threads at
every parallel region, so when the writer takes one of the cores that team runs on, every
op waits for a preempted team member (a step right after a save took 439 ms instead of
67 ms, 2 cores, 2 torch threads, 1 writer thread). Leaving the writer's cores out of the
team (`torch.set_num_threads(cores - writer threads)`) removes that; the run reports both.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

import torch

import ckptstore


def _setup(quick: bool) -> tuple[Any, Any, Any, Any]:
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

    return step, state, model, opt


def overhead(
    quick: bool,
    threads: int,
    codec: str,
    repeat: int,
    scratch: str,
    torch_threads: int,
    lazy: bool = False,
) -> dict:
    """`lazy`: save through `TrainingCheckpointer(lazy=True)` (the copy of weights and
    optimizer state overlaps the next forward/backward) instead of `manager.save()`."""
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        return _overhead(quick, threads, codec, repeat, scratch, lazy)
    finally:
        torch.set_num_threads(before)


def _overhead(quick: bool, threads: int, codec: str, repeat: int, scratch: str, lazy: bool) -> dict:
    step, state, model, opt = _setup(quick)
    for _ in range(3):
        step()
    step_s = statistics.median(_time(step) for _ in range(5))
    run = os.path.join(scratch, f"train-{codec}-{torch.get_num_threads()}-{lazy}")
    with ckptstore.CheckpointManager(run, codec=codec, keep_last=2, threads=threads) as m:
        commits = []
        for i in range(2):
            start = time.perf_counter()
            m.save(i, state()).wait()
            commits.append(time.perf_counter() - start)
        commit_s = max(commits)
        # at least 2x the commit time, and at least a second (fixed costs: fsyncs, retention)
        interval = max(2, math.ceil(max(2 * commit_s, 1.0) / step_s))
        steps = interval * (3 if quick else 8)  # 7 saves a repeat: the figure is ~1% noisy
        ratios, with_, without = [], [], []
        blocked = []  # how long each save held the loop: save(), or after_step() on a save step
        trainer = (
            ckptstore.TrainingCheckpointer(
                m, model=model, optimizer=opt, every_steps=interval, lazy=True,
                handle_signals=False,
            )
            if lazy
            else None
        )  # fmt: skip
        for rep in range(repeat):
            base = steps / _time(lambda: [step() for _ in range(steps)])
            start = time.perf_counter()
            for i in range(1, steps + 1):
                step()
                saving = i % interval == 0
                began = time.perf_counter()
                if trainer is not None:
                    trainer.after_step()  # every_steps=interval: saves on the same steps
                elif saving and i < steps:
                    m.save(10 + rep * steps + i, state())
                if saving and (trainer is not None or i < steps):
                    blocked.append(time.perf_counter() - began)
            ckpt = steps / (time.perf_counter() - start)
            (trainer or m).wait()
            ratios.append(ckpt / base)
            with_.append(ckpt)
            without.append(base)
        if trainer is not None:
            trainer.close()
    return {
        "ratio": statistics.median(ratios),
        "with": statistics.median(with_),
        "without": statistics.median(without),
        "interval_steps": interval,
        "step_s": step_s,
        "commit_s": commit_s,
        "steps": steps,
        "save_blocked_s": statistics.median(blocked),
        "note": (
            f"every {interval} steps ({interval * step_s:.2f} s >= 2x commit {commit_s:.2f} s), "
            f"{steps} steps, writer threads={threads}, torch threads={torch.get_num_threads()}"
            + (", lazy" if lazy else "")
        ),
    }


def _time(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
