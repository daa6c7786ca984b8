"""Pre-emption: turn SIGTERM and SIGINT into a final checkpoint and a clean exit.

A signal can arrive anywhere, in the middle of `optimizer.step()` included, where the
state is half updated: the handler only records it. The training checkpointer acts at
the next step boundary (`after_step()` or `end_epoch()`): it takes a final checkpoint
unless this step is already saved, waits for the write within what is left of the
grace period, and raises SystemExit(128 + signal), so `finally` blocks and atexit
handlers run (Python's default SIGTERM action would skip them).

If no step boundary comes in time (a long validation, a hung collective), a watchdog
thread gives the save already in flight what is left of the grace period, logs which
checkpoint the run will resume from, and ends the process with `os._exit`.

A second signal while stopping is handed to the handler that was there before (for
SIGINT, a KeyboardInterrupt; for SIGTERM, usually death): a way out if the stop hangs.

Handlers are Python-level and so inherited by `fork()`ed children, DataLoader workers
included; an at-fork hook puts the previous handlers back in every child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any] | int | None

_GUARDS: weakref.WeakSet[SignalGuard] = weakref.WeakSet()


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):  # a broken handler must not keep us alive
            handler.flush()


class SignalGuard:
    """Records SIGTERM/SIGINT for the trainer; runs `on_timeout` if it never gets to act."""

    def __init__(
        self,
        signals: Sequence[signal.Signals],
        grace: float,
        on_timeout: Callable[[int, float], None],
    ) -> None:
        self.grace = grace
        self.signum: int | None = None
        self.deadline: float | None = None
        self._on_timeout = on_timeout
        self._handled = threading.Event()
        self._previous: dict[int, Handler] = {}
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: SIGTERM/SIGINT handlers not installed")
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        _GUARDS.add(self)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def remaining(self) -> float:
        return 0.0 if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            log.warning("second %s while stopping: giving up the graceful stop", _name(signum))
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        self.deadline = time.monotonic() + self.grace
        log.warning(
            "received %s: will take a final checkpoint at the next step boundary and exit "
            "(grace period %.0fs)",
            _name(signum),
            self.grace,
        )
        threading.Thread(target=self._watch, name="ckptstore-preempt", daemon=True).start()

    def _watch(self) -> None:
        # Leave the main thread most of the grace period; keep a little for the exit.
        if self._handled.wait(max(0.0, self.remaining() - min(1.0, 0.1 * self.grace))):
            return
        assert self.signum is not None
        self._on_timeout(self.signum, self.remaining())
        flush_logs()
        os._exit(128 + self.signum)

    def handled(self) -> None:
        """The trainer took over: the watchdog stands down."""
        self._handled.set()

    def restore(self) -> None:
        """Put back the handlers that were there before (main thread only)."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _GUARDS.discard(self)

    def _in_child(self) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError):  # forked from a thread, not the main one
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _after_fork_in_child() -> None:
    for guard in list(_GUARDS):
        guard._in_child()
    _GUARDS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
