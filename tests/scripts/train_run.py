"""A tiny training run under TrainingCheckpointer, for the resume and pre-emption tests.

    python train_run.py RUN_DIR LOSS_LOG [--kill-at 6,13] [--kill-in-write 8] ...

Two epochs of 10 steps over 40 samples: an MLP with dropout, AdamW, MultiStepLR, a
shuffled ResumableLoader whose samples draw from Python's, NumPy's and torch's global
generators (noise, scaling, a coin flip), a checkpoint every 4 steps and at each
epoch's end with a validation metric. LOSS_LOG gets "resume STEP EPOCH BATCH" at each
start, "STEP LOSS_HEX" after each step and "done" at the end.

Faults, each fired once per run directory (a marker file remembers it), so the same
command line restarts the run after each kill:
  --kill-at STEPS        SIGKILL itself right after those steps (not checkpoint steps),
                         once the checkpoint before is committed (a known resume point)
  --kill-in-write STEP   SIGKILL itself from the writer thread while the checkpoint of
                         STEP is written and fsynced but not yet renamed into place
  --hang-at STEP         sleep for an hour after that step (a step that never ends)
  --sleep SECONDS        sleep after every step (room to send a signal)
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from torch import nn

import ckptstore
from ckptstore import CheckpointManager, ResumableLoader, TrainingCheckpointer

EPOCHS = 2
SAMPLES = 40
BATCH = 4


class NoisyData(torch.utils.data.Dataset):
    """Fixed inputs; every fetch draws from all three global generators."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(SAMPLES, 8, generator=g)
        self.y = torch.randn(SAMPLES, 1, generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i] + 0.1 * torch.randn(8)
        x = x * float(np.random.uniform(0.9, 1.1))
        if random.random() < 0.5:
            x = -x
        return x, self.y[i]


def build(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[7, 15], gamma=0.5)
    return model, optimizer, scheduler


def fire_once(run_dir: str, what: str) -> bool:
    marker = os.path.join(os.path.dirname(run_dir), f"fired-{what}")
    if os.path.exists(marker):
        return False
    with open(marker, "w") as f:
        f.flush()
        os.fsync(f.fileno())
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("loss_log")
    parser.add_argument("--kill-at", default="")
    parser.add_argument("--kill-in-write", type=int, default=None)
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--grace", type=float, default=30.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    kill_at = {int(s) for s in args.kill_at.split(",") if s}

    def before_rename(tmp: str) -> None:
        step = args.kill_in_write
        if step is not None and f"step-{step:09d}" in tmp and fire_once(args.run_dir, "write"):
            os.kill(os.getpid(), signal.SIGKILL)

    random.seed(99)  # overwritten by resume(); the first run starts from these
    np.random.seed(99)
    model, optimizer, scheduler = build()
    loader = ResumableLoader(NoisyData(), batch_size=BATCH, shuffle=True, seed=7)
    val_x = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    manager = CheckpointManager(args.run_dir, metric="val_loss", _before_rename=before_rename)
    with (
        open(args.loss_log, "a") as log,
        manager,
        TrainingCheckpointer(
            manager,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            loader=loader,
            every_steps=4,
            grace_period=args.grace,
        ) as ckpt,
    ):
        start = ckpt.resume()
        print("resume", start.step, start.epoch, start.batch, file=log, flush=True)
        while loader.epoch < EPOCHS:
            model.train()
            for x, y in loader:
                loss = nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                print(ckpt.step + 1, loss.item().hex(), file=log, flush=True)
                ckpt.after_step()
                if ckpt.step in kill_at and fire_once(args.run_dir, f"kill-{ckpt.step}"):
                    ckpt.wait()  # a known resume point: the checkpoint before the kill
                    os.kill(os.getpid(), signal.SIGKILL)
                if ckpt.step == args.hang_at:
                    time.sleep(3600)
                time.sleep(args.sleep)
            model.eval()
            with torch.no_grad():
                val = float(model(val_x).pow(2).mean())
            ckpt.end_epoch(metrics={"val_loss": val})
        print("done", ckptstore.__version__, file=log, flush=True)


if __name__ == "__main__":
    main()
