"""The training-loop adapter: checkpoint a run and resume it exactly.

`TrainingCheckpointer` puts a `CheckpointManager` into a training loop. It knows the
objects that make up a run (model, optimizer, LR scheduler, AMP grad scaler, a
`ResumableLoader`, the global random generators, and any `extra` object with
`state_dict`/`load_state_dict`), counts optimizer steps, saves on a schedule, turns
SIGTERM/SIGINT into a final checkpoint, and on `resume()` puts all of it back as it
was at the newest sound checkpoint.

    loader = ResumableLoader(dataset, batch_size=32, seed=0)
    with TrainingCheckpointer("runs/exp1", model=model, optimizer=optimizer,
                              scheduler=scheduler, loader=loader, every_steps=500,
                              metric="val_loss") as ckpt:
        ckpt.resume()
        while loader.epoch < epochs:
            for x, y in loader:
                ...; optimizer.step(); scheduler.step()
                ckpt.after_step()
            ckpt.end_epoch(metrics={"val_loss": evaluate(model)})

The state of a checkpoint is a dict with the keys "model", "optimizer", "scheduler",
"scaler", "loader", "extra" (those present), "rng" and "progress" (step, epoch, batch);
any ckptstore tool reads it. See docs/training.md for what is exact, and when.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ._lazy import LazySave, copy_except, live_tensors
from ._loader import ResumableLoader
from ._manager import CheckpointManager
from ._preempt import SignalGuard
from ._read import MapLocation
from ._rng import capture_rng, restore_rng
from ._writer import SaveHandle
from .errors import PendingSaveTimeoutError

log = logging.getLogger(__name__)

__all__ = ["Position", "ResumableLoader", "Stateful", "TrainingCheckpointer"]


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


@dataclass(frozen=True)
class Position:
    """Where a run continues: optimizer steps done, epoch, batches consumed in that epoch."""

    step: int
    epoch: int
    batch: int


class TrainingCheckpointer:
    """Checkpoints of a training loop: scheduled saves, exact resume, pre-emption.

    `manager` is a run directory (a `CheckpointManager` is opened on it, with
    `manager_options`, and closed with this object) or an open manager (left open).
    Saves happen every `every_steps` optimizer steps (`after_step()`) and, with
    `at_epoch_end`, at `end_epoch()`; a periodic save that falls on the last batch
    of an epoch is left to `end_epoch()`, which carries the validation metric.
    `lazy=True` lets the snapshot of weights and optimizer state overlap the next
    forward/backward (see `ckptstore._lazy` for when that is safe). `grace_period`
    bounds the stop after SIGTERM/SIGINT; `handle_signals=False` leaves signals alone.
    """

    def __init__(
        self,
        manager: CheckpointManager | str | os.PathLike[str],
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        loader: ResumableLoader | None = None,
        extra: Mapping[str, Stateful] | None = None,
        every_steps: int | None = None,
        at_epoch_end: bool = True,
        metadata: Mapping[str, Any] | None = None,
        lazy: bool = False,
        strict: bool = True,
        map_location: MapLocation = "cpu",
        grace_period: float = 30.0,
        handle_signals: bool = True,
        **manager_options: Any,
    ) -> None:
        if every_steps is not None and (type(every_steps) is not int or every_steps < 1):
            raise ValueError(f"every_steps must be a positive int or None, not {every_steps!r}")
        if grace_period <= 0:
            raise ValueError(f"grace_period must be positive, not {grace_period!r}")
        if isinstance(manager, CheckpointManager):
            if manager_options:
                raise TypeError("manager options go to the manager you opened, not here")
            self.manager, self._owns_manager = manager, False
        else:
            self.manager, self._owns_manager = CheckpointManager(manager, **manager_options), True
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.loader = loader
        self.extra = dict(extra or {})
        self.every_steps = every_steps
        self.at_epoch_end = at_epoch_end
        self.metadata = dict(metadata or {})
        self.lazy = lazy
        self.strict = strict
        self.map_location = map_location
        self._step = 0
        self._epoch = 0  # used when there is no loader to ask
        self._last_saved: int | None = None  # the step saved or resumed last, by this object
        self._lazy_save = LazySave()
        self._hooks: list[Any] = []
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
        self._closed = False
        self._guard: SignalGuard | None = None
        if handle_signals:
            signals = (signal.SIGTERM, signal.SIGINT)
            self._guard = SignalGuard(signals, grace_period, self._out_of_grace)

    # -- where the run is -----------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps done (counted by `after_step()`, restored by `resume()`)."""
        return self._step

    @property
    def position(self) -> Position:
        if self.loader is not None:
            return Position(self._step, self.loader.epoch, self.loader.batches)
        return Position(self._step, self._epoch, 0)

    @property
    def stop_requested(self) -> bool:
        """A SIGTERM/SIGINT came; the next `after_step()`/`end_epoch()` saves and exits."""
        return self._guard is not None and self._guard.requested

    # -- the state --------------------------------------------------------------------------
    def _objects(self) -> dict[str, Stateful]:
        objects: dict[str, Stateful] = {"model": self.model}
        for key, target in (
            ("optimizer", self.optimizer),
            ("scheduler", self.scheduler),
            ("scaler", self.scaler),
            ("loader", self.loader),
        ):
            if target is not None:
                objects[key] = target
        return objects

    def state(self) -> dict[str, Any]:
        """What a checkpoint of this run holds right now (tensors not copied)."""
        state = {key: target.state_dict() for key, target in self._objects().items()}
        if self.extra:
            state["extra"] = {name: target.state_dict() for name, target in self.extra.items()}
        state["rng"] = capture_rng()
        position = self.position
        state["progress"] = {
            "step": position.step,
            "epoch": position.epoch,
            "batch": position.batch,
        }
        return state

    # -- resuming -----------------------------------------------------------------------------
    def resume(self) -> Position:
        """Load the newest sound checkpoint into every object; where to continue from.

        A fresh run (no checkpoint) returns Position(0, 0, 0) and changes nothing.
        """
        state = self.manager.load(map_location=self.map_location)
        if state is None:
            log.info("no checkpoint in %s: starting from step 0", self.manager.directory)
            self._last_saved = self._step
            return self.position
        self._apply(state)
        position = self.position
        log.info(
            "resumed from step %d (epoch %d, batch %d) in %s",
            position.step,
            position.epoch,
            position.batch,
            self.manager.directory,
        )
        return position

    def _apply(self, state: Mapping[str, Any]) -> None:
        progress = self._require(state, "progress")
        for key, target in self._objects().items():
            value = self._require(state, key)
            if value is None:
                continue
            if key == "model":
                self._load_model(value)
            elif key == "scaler" and not value:
                log.debug("the checkpoint's grad scaler was disabled; nothing to restore")
            else:
                target.load_state_dict(value)
        extra = state.get("extra", {})
        for name, target in self.extra.items():
            value = self._require(extra, name)
            if value is not None:
                target.load_state_dict(value)
        rng = self._require(state, "rng")
        if rng is not None:
            restore_rng(rng)  # last: nothing after it may draw
        if progress is not None:
            self._step = int(progress["step"])
            self._epoch = int(progress["epoch"])
        self._last_saved = self._step

    def _require(self, state: Mapping[str, Any], key: str) -> Any:
        if key in state:
            return state[key]
        if self.strict:
            raise KeyError(
                f"the checkpoint in {self.manager.directory} has no {key!r}; pass "
                f"strict=False to resume without it (it is left as it is)"
            )
        log.warning("the checkpoint has no %r; leaving it as it is", key)
        return None

    def _load_model(self, value: Any) -> None:
        result = self.model.load_state_dict(value, strict=self.strict)
        if result.missing_keys or result.unexpected_keys:
            log.warning(
                "model loaded non-strictly: missing %s, unexpected %s",
                result.missing_keys,
                result.unexpected_keys,
            )

    # -- saving -------------------------------------------------------------------------------
    def after_step(self, metrics: Mapping[str, Any] | None = None) -> SaveHandle | None:
        """Call once after each optimizer step: counts it, saves when one is due.

        After SIGTERM/SIGINT this takes the final checkpoint and raises SystemExit.
        """
        self._step += 1
        if self.stop_requested:
            self._stop(metrics)
        due = self.every_steps is not None and self._step % self.every_steps == 0
        end_of_epoch_follows = (
            self.at_epoch_end and self.loader is not None and self.loader.epoch_done
        )
        if due and not end_of_epoch_follows:
            return self.save(metrics)
        return None

    def end_epoch(self, metrics: Mapping[str, Any] | None = None) -> SaveHandle | None:
        """Call once after each epoch (after validation); saves with `metrics` if at_epoch_end."""
        if self.loader is None:
            self._epoch += 1
        if self.stop_requested:
            self._stop(metrics)
        if not self.at_epoch_end:
            return None
        return self.save(metrics)

    def save(
        self, metrics: Mapping[str, Any] | None = None, *, lazy: bool | None = None
    ) -> SaveHandle | None:
        """Checkpoint the run now, as step `self.step`; lazy saves return None.

        A checkpoint already taken at this step (a periodic one, before `end_epoch`)
        is replaced, so the later one, with its metrics and position, wins.
        """
        self._check_open()
        self._lazy_save.wait()
        step = self._step
        # Once this object resumed or saved, the run's branch is its own: a checkpoint at
        # or after `step` is stale (or this step's own, before end_epoch) and is replaced.
        # Before that, the manager refuses, which catches a forgotten resume().
        overwrite = self._last_saved is not None
        state = self.state()
        self._last_saved = step
        if not (self.lazy if lazy is None else lazy):
            return self.manager.save(
                step, state, metrics=metrics, metadata=self.metadata, overwrite=overwrite
            )
        optimizers = [self.optimizer] if self.optimizer is not None else []
        state = copy_except(state, live_tensors(self.model, optimizers))
        metadata = self.metadata
        self._lazy_save.start(
            lambda: self.manager.save(
                step, state, metrics=metrics, metadata=metadata, overwrite=overwrite
            )
        )
        return None

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._lazy_save.wait()  # the lazy snapshot reads the weights this step will change

    def wait(self, timeout: float | None = None) -> None:
        """Block until every save so far is committed; re-raise a failure, once."""
        self._lazy_save.wait()
        self.manager.wait(timeout)

    # -- pre-emption ------------------------------------------------------------------------
    def _stop(self, metrics: Mapping[str, Any] | None) -> None:
        guard = self._guard
        assert guard is not None and guard.signum is not None
        guard.handled()
        signum = guard.signum
        name = signal.Signals(signum).name
        try:
            self._lazy_save.wait()
            self.manager.wait(guard.remaining())  # the save in flight, so a slot is free
            if self._last_saved != self._step:
                self.save(metrics, lazy=False)
            self.manager.wait(guard.remaining())
            log.info(
                "stopping on %s: checkpoint of step %s committed in %s; exiting with status %d",
                name,
                self.manager.latest_step,
                self.manager.directory,
                128 + signum,
            )
        except PendingSaveTimeoutError:
            log.error(
                "stopping on %s: the final checkpoint did not commit within the %.0fs grace "
                "period; the run will resume from step %s",
                name,
                guard.grace,
                self.manager.latest_step,
            )
        finally:
            try:
                self.close(timeout=guard.remaining())
            except Exception as error:  # the exit goes ahead; say what went wrong
                log.error("closing after %s failed: %r", name, error)
        raise SystemExit(128 + signum)

    def _out_of_grace(self, signum: int, remaining: float) -> None:
        """The watchdog's last act: no step boundary came within the grace period."""
        with contextlib.suppress(Exception):
            self.manager.wait(remaining)
        log.error(
            "%s: no step boundary within the %.0fs grace period; exiting now, the run will "
            "resume from step %s",
            signal.Signals(signum).name,
            self._guard.grace if self._guard else 0.0,
            self.manager.latest_step,
        )

    # -- closing ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this TrainingCheckpointer is closed")

    def close(self, timeout: float | None = None) -> None:
        """Finish pending saves, remove the hooks and signal handlers, close an owned manager."""
        if self._closed:
            return
        self._closed = True
        for hook in self._hooks:
            hook.remove()
        if self._guard is not None:
            self._guard.restore()
        try:
            self._lazy_save.wait()
        finally:
            if self._owns_manager:
                self.manager.close(timeout)
            else:
                self.manager.wait(timeout)

    def __enter__(self) -> TrainingCheckpointer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None or isinstance(exc, SystemExit):
            self.close()
            return
        try:  # an exception is in flight: never mask it
            self.close(self.manager._writer.exit_timeout if self.manager._writer else None)
        except Exception as error:
            log.error("while closing after %r, saving failed too: %r", exc, error)

    def __repr__(self) -> str:
        p = self.position
        return f"<TrainingCheckpointer step {p.step} epoch {p.epoch} batch {p.batch}>"
