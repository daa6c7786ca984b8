"""Capture and restore the random number generators a training step draws from.

Four generators: Python's `random`, NumPy's legacy global `RandomState` (what
`np.random.rand` uses), torch's CPU generator, and torch's CUDA generators (one per
device) once CUDA is initialized. Each state is stored in a form the manifest holds
without pickle: torch states are uint8 tensors already; the 625 words of Python's
Mersenne Twister and NumPy's 624 key words go into int64 tensors, the rest as ints
and floats.

Generators the caller owns (`np.random.default_rng()`, `torch.Generator()` objects)
are not global and are not captured; put their state in `extra=` instead.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    """The state of every global generator, as a manifest-friendly dict."""
    version, words, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(words, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put every generator back to the state `capture_rng` returned."""
    python = state["python"]
    words = tuple(int(w) for w in python["state"].tolist())
    random.setstate((python["version"], words, python["gauss_next"]))

    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )

    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available():
        log.warning(
            "the checkpoint holds CUDA generator states but CUDA is not available here; "
            "GPU randomness (dropout on the GPU) will not repeat the original run"
        )
        return
    if len(cuda) != torch.cuda.device_count():
        log.warning(
            "the checkpoint holds CUDA generator states for %d devices, this process sees "
            "%d; restoring the ones both have",
            len(cuda),
            torch.cuda.device_count(),
        )
    for device, rng in enumerate(cuda[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(rng.cpu(), device)
