"""What checking every byte costs a plain restore: ckptstore.load of a codec-none
checkpoint, with its checksums and with the hashing replaced by a constant (the load then
fails its check at the end, after every byte is read), against torch.load of the same
tensors. Page cache warm, interleaved, nine rounds.

    python benchmarks/profiles/verify_cost.py a_adamw64m
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _peers as peers
import _states as st

import ckptstore
from ckptstore import _read
from ckptstore.errors import CorruptCheckpointError


def main(name: str) -> None:
    flat = st.build_states(False)[name]()
    scratch = tempfile.mkdtemp()
    try:
        plain = peers.CkptstoreAsync("none", 2)
        ours = os.path.join(scratch, "none")
        plain(flat, ours)
        plain.close()
        theirs = os.path.join(scratch, "torch.pt")
        peers.torch_save(flat, theirs)
        real = _read.hash_bytes

        def load() -> None:
            with contextlib.suppress(CorruptCheckpointError):  # the constant never matches
                ckptstore.load(ours)

        runs: dict[str, Callable[[], object]] = {
            "verified": load,
            "unverified": load,
            "torch.load": lambda: torch.load(theirs, weights_only=True),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for rep in range(9):
            for kind in list(runs) if rep % 2 == 0 else list(runs)[::-1]:
                _read.hash_bytes = real if kind != "unverified" else (lambda view: "0")
                times[kind].append(st.timed(runs[kind]))
        _read.hash_bytes = real
        for kind, values in times.items():
            print(f"{name} {kind}: best {min(values) * 1e3:.1f} ms, "
                  f"median {statistics.median(values) * 1e3:.1f} ms")  # fmt: skip
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "a_adamw64m")
