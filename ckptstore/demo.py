"""`ckptstore demo`: train a gradient-checkpointed forecaster on real market data.

The job a user runs first. It trains `TransformerForecaster` (gradient checkpointing on
every layer by default) to predict the next trading day's S&P 500 volatility from the
past days of the S&P 500 and NASDAQ (1999-2018, shipped by the `arch` package; see
`_demo_data` for the task), and checkpoints as it goes:

* every `--save-every` steps and at each epoch's end, zstd-compressed, keeping the last
  3 checkpoints and the best by validation loss;
* a rerun of the same command resumes from the newest sound checkpoint, exactly: the
  losses and the final weights are bitwise those of an uninterrupted run, whether the
  first run was killed with `kill -9` or by `--crash-after-steps N`.

It ends with a summary: the best step and its validation loss against the persistence
baseline, the checkpoint size raw -> stored, and how long `save` blocked training.

    python -m ckptstore.demo --epochs 2 --crash-after-steps 100   # dies after step 100
    python -m ckptstore.demo --epochs 2                           # resumes at the last save
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._demo_data import DemoDataError, MarketTask, build_task, load_prices
from ._manager import CheckpointManager
from .models import TransformerForecaster
from .train import ResumableLoader, TrainingCheckpointer

log = logging.getLogger("ckptstore.demo")  # not __name__, which is "__main__" under -m

MARKER = "ckptstore-demo.json"  # written first into a run directory the demo creates
CHECKPOINTS = "checkpoints"  # the CheckpointManager's directory inside the run directory


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the run's numbers; a resumed run must use the same."""

    seed: int = 0
    epochs: int = 8
    batch_size: int = 64
    window: int = 32
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 128
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.01
    save_every: int = 50
    checkpoint_policy: str = "every"


@dataclass
class SaveTimes:
    """Seconds each `save` call blocked the training loop, in this process."""

    blocked: list[float] = dataclasses.field(default_factory=list)


# -- the command line ----------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="ckptstore demo",
        description="Train a gradient-checkpointed transformer on S&P 500 / NASDAQ "
        "volatility with crash-safe checkpoints; rerun to resume.",
    )
    p.add_argument("--run-dir", default="runs/demo", help="where checkpoints go (%(default)s)")
    p.add_argument("--fresh", action="store_true", help="delete an earlier demo run there first")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--window", type=int, default=d.window, help="days of input per sample")
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--heads", type=int, default=d.n_heads)
    p.add_argument("--layers", type=int, default=d.n_layers)
    p.add_argument("--d-ff", type=int, default=d.d_ff)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between saves")
    p.add_argument(
        "--checkpoint-policy",
        choices=("none", "every", "segments"),
        default=d.checkpoint_policy,
        help="gradient checkpointing of the encoder layers (%(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--crash-after-steps",
        type=int,
        default=None,
        metavar="N",
        help="SIGKILL this process right after step N (simulates a crash; rerun to resume)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log every commit")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "window", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def config_from(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        window=args.window,
        d_model=args.d_model,
        n_heads=args.heads,
        n_layers=args.layers,
        d_ff=args.d_ff,
        lr=args.lr,
        save_every=args.save_every,
        checkpoint_policy=args.checkpoint_policy,
    )


# -- the run directory ---------------------------------------------------------------------
class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message says what to do instead."""


def prepare_run_dir(run_dir: Path, config: DemoConfig, fresh: bool) -> None:
    """Create (or, with `fresh`, recreate) the run directory; check a resume's settings.

    Only a directory holding the demo's marker is ever deleted, so a mistyped
    `--run-dir` cannot remove someone's files. Resuming with other settings would not
    continue the same run, so it is refused, saying what to do instead.
    """
    marker = run_dir / MARKER
    wanted = dataclasses.asdict(config)
    if run_dir.exists() and fresh:
        if not marker.is_file():
            raise RunDirError(
                f"{run_dir} exists but was not created by the demo (it has no {MARKER}); "
                f"not deleting it: choose another --run-dir"
            )
        shutil.rmtree(run_dir)
    if marker.is_file():
        saved = json.loads(marker.read_text())
        changed = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        if changed:
            raise RunDirError(
                f"{run_dir} holds a demo run with other settings ({', '.join(changed)}); "
                f"rerun with its flags to resume it, or add --fresh to start over"
            )
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(
            f"{run_dir} is not empty and was not created by the demo (it has no {MARKER}); "
            f"choose another --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_marker(marker, config)


def _write_marker(marker: Path, config: DemoConfig) -> None:
    """Write the marker atomically, so a kill during it leaves none or a whole one."""
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
    os.replace(tmp, marker)


# -- the model and one training step -------------------------------------------------------
def build_model(
    config: DemoConfig, task: MarketTask, total_steps: int
) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """Model, optimizer and LR schedule (cosine over the run), initialised from the seed."""
    torch.manual_seed(config.seed)
    model = TransformerForecaster(
        d_in=task.features.shape[1],
        d_model=config.d_model,
        n_heads=config.n_heads,
        n_layers=config.n_layers,
        d_ff=config.d_ff,
        dropout=config.dropout,
        checkpoint=config.checkpoint_policy,  # type: ignore[arg-type]
        max_len=config.window,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return model, optimizer, scheduler


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, task: MarketTask, days: torch.Tensor
) -> float:
    model.train()
    loss = nn.functional.mse_loss(model(task.inputs(days)), task.target[days])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.item())


@torch.no_grad()
def evaluate(model: nn.Module, task: MarketTask, days: torch.Tensor, batch: int = 256) -> float:
    """Mean squared error over `days` (standardised log volatility); draws no randomness."""
    model.eval()
    total = 0.0
    for chunk in days.split(batch):
        total += float(((model(task.inputs(chunk)) - task.target[chunk]) ** 2).sum())
    return total / len(days)


def baseline_loss(task: MarketTask, days: torch.Tensor) -> float:
    """The persistence forecast's mean squared error (yesterday's volatility)."""
    return float(((task.baseline(days) - task.target[days]) ** 2).mean())


def crash(step: int) -> None:
    """Die as `kill -9` would: no atexit, no flush of pending saves, no cleanup."""
    log.warning("--crash-after-steps: killing this process (SIGKILL) after step %d", step)
    sys.stdout.flush()
    sys.stderr.flush()
    kill = getattr(signal, "SIGKILL", None)
    if kill is not None:
        os.kill(os.getpid(), kill)
    os._exit(137)


# -- the run's history -------------------------------------------------------------------------
@dataclass
class History:
    """Losses and the best epoch so far; checkpointed through the adapter's `extra`."""

    losses: list[float] = dataclasses.field(default_factory=list)  # train loss per step
    epochs: list[dict[str, float]] = dataclasses.field(default_factory=list)
    best_step: int | None = None
    best_val: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "epochs": [dict(e) for e in self.epochs],
            "best_step": self.best_step,
            "best_val": self.best_val,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = [float(x) for x in state["losses"].tolist()]
        self.epochs = [dict(e) for e in state["epochs"]]
        self.best_step = state["best_step"]
        self.best_val = state["best_val"]

    def record_epoch(self, epoch: int, step: int, train: float, val: float) -> bool:
        """Add an epoch's line; True when `val` is the best so far."""
        self.epochs.append({"epoch": epoch, "step": step, "train": train, "val": val})
        best = self.best_val is None or val < self.best_val
        if best:
            self.best_step, self.best_val = step, val
        return best


# -- the loop ----------------------------------------------------------------------------------
def _progress_bar(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )


@dataclass
class RunResult:
    history: History
    steps: int
    resumed_from: int | None
    blocked: list[float]  # seconds each save blocked the loop, in this process


def train(
    config: DemoConfig,
    task: MarketTask,
    run_dir: Path,
    crash_after: int | None,
    show_progress: bool,
) -> RunResult:
    """Train (or resume) the run in `run_dir`; checkpoints through `TrainingCheckpointer`."""
    loader = ResumableLoader(task.train_days, batch_size=config.batch_size, seed=config.seed)
    model, optimizer, scheduler = build_model(config, task, config.epochs * len(loader))
    history = History()
    blocked: list[float] = []
    with TrainingCheckpointer(
        run_dir / CHECKPOINTS,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        extra={"history": history},
        every_steps=config.save_every,
        keep_last=3,
        keep_best=1,
        metric="val_loss",
        mode="min",
        codec="zstd",
    ) as ckpt:
        start = ckpt.resume()
        resumed_from = start.step if start.step else None
        with _progress_bar(show_progress) as bar:
            while loader.epoch < config.epochs:
                bar_task = bar.add_task(
                    f"epoch {loader.epoch + 1}/{config.epochs}",
                    total=len(loader),
                    completed=loader.batches,
                    loss="-",
                )
                for days in loader:
                    history.losses.append(train_step(model, optimizer, task, days))
                    scheduler.step()
                    _timed(blocked, ckpt.after_step)
                    bar.update(bar_task, advance=1, loss=f"{history.losses[-1]:.4f}")
                    if ckpt.step == crash_after and not loader.epoch_done:
                        crash(ckpt.step)
                val = _end_epoch(config, task, model, history, ckpt.step, len(loader))
                _timed(blocked, ckpt.end_epoch, {"val_loss": val})
                if ckpt.step == crash_after:
                    crash(ckpt.step)
                bar.remove_task(bar_task)
        ckpt.wait()
        return RunResult(history, ckpt.step, resumed_from, blocked)


def _timed(blocked: list[float], call: Any, *args: Any) -> None:
    """Call `after_step`/`end_epoch`; when it saved, note how long the loop was held."""
    begin = time.perf_counter()
    handle = call(*args)
    if handle is not None:
        blocked.append(time.perf_counter() - begin)


def _end_epoch(
    config: DemoConfig,
    task: MarketTask,
    model: nn.Module,
    history: History,
    step: int,
    per_epoch: int,
) -> float:
    """Validate and log the epoch's line; the validation loss."""
    epoch = len(history.epochs) + 1
    train_loss = statistics.fmean(history.losses[-per_epoch:])
    val = evaluate(model, task, task.val_days)
    best = history.record_epoch(epoch, step, train_loss, val)
    log.info(
        "epoch %d/%d  step %d  train %.4f  val %.4f%s",
        epoch,
        config.epochs,
        step,
        train_loss,
        val,
        "  * best" if best else "",
    )
    return val


# -- the summary -------------------------------------------------------------------------------
def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def summarize(
    config: DemoConfig, task: MarketTask, run: RunResult, run_dir: Path, seconds: float
) -> dict[str, Any]:
    """The run's figures, as printed at the end and written to summary.json."""
    manager = CheckpointManager(run_dir / CHECKPOINTS, read_only=True)
    infos = [c for c in manager.checkpoints() if c.sound]
    latest = infos[-1] if infos else None
    history, blocked = run.history, run.blocked
    return {
        "steps": run.steps,
        "resumed_from": run.resumed_from,
        "seconds": seconds,
        "best_step": history.best_step,
        "best_val_loss": history.best_val,
        "baseline_val_loss": baseline_loss(task, task.val_days),
        "final_val_loss": history.epochs[-1]["val"] if history.epochs else None,
        "checkpoint_raw_bytes": latest.raw_bytes if latest else None,
        "checkpoint_stored_bytes": latest.stored_bytes if latest else None,
        "kept_steps": [c.step for c in infos],
        "saves": len(blocked),
        "save_blocked_mean_s": statistics.fmean(blocked) if blocked else None,
        "save_blocked_max_s": max(blocked) if blocked else None,
        "checkpoint_policy": config.checkpoint_policy,
    }


def format_summary(s: dict[str, Any], run_dir: Path) -> str:
    """The summary printed at the end of a run (figures of `summarize`)."""
    lines = [f"summary of {run_dir}"]
    if s["resumed_from"] is None:
        trained = f"{s['steps']} steps"
    elif s["resumed_from"] == s["steps"]:
        trained = f"{s['steps']} steps (already complete; nothing to do)"
    else:
        trained = f"{s['steps']} steps, resumed at step {s['resumed_from']}"
    lines.append(f"  trained      {trained}; {s['seconds']:.1f} s in this run")
    if s["best_val_loss"] is not None:
        best, base = s["best_val_loss"], s["baseline_val_loss"]
        than = f"{1 - best / base:.1%} lower" if best < base else f"{best / base - 1:.1%} higher"
        lines.append(
            f"  best         step {s['best_step']}: val loss {best:.4f}, {than} than "
            f"yesterday's volatility ({base:.4f})"
        )
    if s["checkpoint_raw_bytes"] is not None:
        ratio = s["checkpoint_stored_bytes"] / s["checkpoint_raw_bytes"]
        lines.append(
            f"  checkpoint   {_mb(s['checkpoint_raw_bytes'])} raw -> "
            f"{_mb(s['checkpoint_stored_bytes'])} stored (zstd, {ratio:.2f}); "
            f"kept steps {s['kept_steps']}"
        )
    if s["saves"]:
        lines.append(
            f"  save blocked mean {s['save_blocked_mean_s'] * 1e3:.1f} ms, "
            f"max {s['save_blocked_max_s'] * 1e3:.1f} ms over {s['saves']} saves in this run"
        )
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------
class _DemoLogFilter(logging.Filter):
    """The demo's own lines, plus the library's warnings (all of it with --verbose)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return (
            self.verbose
            or record.name in (log.name, "ckptstore.train")
            or record.levelno >= logging.WARNING
        )


class _Stderr:
    """sys.stderr as it is at each write, so the progress bar's redirection sees log lines."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 on success, 2 on a usage, data or run-directory error."""
    args = parse_args(argv)
    config = config_from(args)
    run_dir = Path(args.run_dir)

    handler = logging.StreamHandler(_Stderr())
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_DemoLogFilter(args.verbose))
    library = logging.getLogger("ckptstore")
    old_level = library.level
    library.setLevel(logging.INFO)
    library.addHandler(handler)
    try:
        return _run(args, config, run_dir)
    except (DemoDataError, RunDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        library.removeHandler(handler)
        library.setLevel(old_level)


def _run(args: argparse.Namespace, config: DemoConfig, run_dir: Path) -> int:
    task = build_task(load_prices(), config.window)
    prepare_run_dir(run_dir, config, args.fresh)
    log.info(
        "%d training days (%s..%s), %d validation days (%s..%s); checkpoints in %s",
        len(task.train_days),
        task.dates[int(task.train_days[0])],
        task.dates[int(task.train_days[-1])],
        len(task.val_days),
        task.dates[int(task.val_days[0])],
        task.dates[int(task.val_days[-1])],
        run_dir / CHECKPOINTS,
    )
    start = time.perf_counter()
    show = not args.no_progress and sys.stderr.isatty()
    run = train(config, task, run_dir, args.crash_after_steps, show)
    summary = summarize(config, task, run, run_dir, time.perf_counter() - start)
    _write_json(run_dir / "summary.json", summary)
    print(format_summary(summary, run_dir))
    return 0


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
