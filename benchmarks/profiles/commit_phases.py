"""Time of each phase of a commit: checksums, payload (encode + write), fsyncs, manifest.

    python benchmarks/profiles/commit_phases.py [a_adamw64m|b_minilm_fp32] [zstd|none]

Wraps the commit's steps in place (nothing else changes) and prints four saves.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _states as st

import ckptstore
from ckptstore import _commit

times: dict[str, list[float]] = {}


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.setdefault(name, []).append(time.perf_counter() - start)

    return wrapper


def main(state: str, codec: str) -> None:
    flat = st.build_states(False)[state]()
    os.fsync = timed("fsync", os.fsync)  # type: ignore[assignment]
    for name in ("write_payload", "write_durable"):
        setattr(_commit, name, timed(name, getattr(_commit, name)))
    scratch = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR"))
    try:
        with ckptstore.Checkpointer(codec=codec) as checkpointer:
            for i in range(4):
                times.clear()
                start = time.perf_counter()
                result = checkpointer.save(os.path.join(scratch, f"c{i}"), flat).wait()
                total = time.perf_counter() - start
                phases = ", ".join(
                    f"{k} {'+'.join(f'{v * 1e3:.0f}' for v in vs)}" for k, vs in times.items()
                )
                print(f"{state} {codec}: save+commit {total * 1e3:.0f} ms "
                      f"({result.stored_bytes / 1e6:.0f} MB stored): {phases} (ms)")  # fmt: skip
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main(*(sys.argv[1:3] if len(sys.argv) > 2 else ("a_adamw64m", "zstd")))
