"""Lazy snapshots: the host copy of weights and optimizer state overlaps the next step.

An eager `save()` copies every tensor before it returns. In lazy mode the training
checkpointer copies only what the next forward/backward may change (buffers such as
BatchNorm running statistics, and every small tensor that is not a weight or optimizer
state) before returning, and hands the rest to a background thread that calls the
manager's ordinary `save()`, whose snapshot then reads weights and optimizer state
while the caller runs forward and backward. Those tensors change in place only in
`optimizer.step()`, which waits for the thread first (a step pre-hook).

Safe exactly when nothing writes weights or optimizer state in place between the save
and the next `optimizer.step()`: no EMA/SWA updates of the weights themselves, no
`p.data` edits, no weight copying for tying, no `load_state_dict`. (An EMA *copy* held
in another module is fine: its tensors are not the optimizer's parameters, so they are
copied eagerly.)

CUDA: the thread issues its copies on the stream that was current in the caller at
`save()`, so the caller's later kernels (the optimizer step) are ordered after them.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from ._writer import SaveHandle

Key = tuple[str, int]


def tensor_key(tensor: torch.Tensor) -> Key:
    return (str(tensor.device), tensor.data_ptr())


def live_tensors(model: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> set[Key]:
    """Tensors that change in place only in `optimizer.step()`: weights and optimizer state."""
    keys = {tensor_key(p) for p in model.parameters()}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            keys.update(tensor_key(p) for p in group["params"])
        for per_param in optimizer.state.values():
            keys.update(tensor_key(v) for v in per_param.values() if isinstance(v, torch.Tensor))
    return keys


def copy_except(value: Any, deferred: set[Key]) -> Any:
    """`value` with every tensor copied now, except those in `deferred`."""
    if isinstance(value, torch.Tensor):
        if tensor_key(value) in deferred:
            return value
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if type(value) is OrderedDict:
        out: Any = OrderedDict((k, copy_except(v, deferred)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata
        return out
    if type(value) in (dict, Counter):
        return type(value)({k: copy_except(v, deferred) for k, v in value.items()})
    if type(value) in (list, tuple):
        return type(value)(copy_except(v, deferred) for v in value)
    return value  # plain values, and anything save() will refuse with its key named


class LazySave:
    """At most one save whose snapshot a background thread is taking."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._handle: SaveHandle | None = None
        self._error: BaseException | None = None

    def start(self, save: Callable[[], SaveHandle]) -> None:
        """Run `save` (which takes the snapshot and queues the write) in a thread."""
        self.wait()
        stream = torch.cuda.current_stream() if torch.cuda.is_initialized() else None
        self._handle = None
        self._error = None
        self._thread = threading.Thread(
            target=self._run, args=(save, stream), name="ckptstore-lazy-snapshot", daemon=True
        )
        self._thread.start()

    def _run(self, save: Callable[[], SaveHandle], stream: Any) -> None:
        try:
            if stream is not None:
                with torch.cuda.stream(stream):
                    self._handle = save()
            else:
                self._handle = save()
        except BaseException as error:  # re-raised in the caller's thread by wait()
            self._error = error

    def pending(self) -> bool:
        return self._thread is not None

    def wait(self) -> SaveHandle | None:
        """Block until the snapshot is taken; re-raise its error, once."""
        thread, self._thread = self._thread, None
        if thread is None:
            return None
        thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._handle
