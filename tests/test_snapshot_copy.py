"""The snapshot's parallel CPU copy: helper threads fill the staging buffer exactly.

Helpers are only used when torch's threads leave cores free, which depends on the machine;
these tests force them (and small pieces) so every path runs on any machine. The truth is
the source tensors themselves.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import _snapshot
from ckptstore._layout import plan
from ckptstore._tree import flatten


@pytest.fixture
def forced_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_snapshot._helpers, "count", lambda: 3)
    monkeypatch.setattr(_snapshot, "COPY_PIECE", 4096)
    monkeypatch.setattr(_snapshot, "PARALLEL_COPY_MIN", 0)


def state() -> dict[str, object]:
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(300, 257, generator=gen)  # 308400 bytes: 76 pieces, last one short
    return {
        "big": big,
        "transposed": torch.randn(64, 96, generator=gen).t(),  # not contiguous: one job
        "bools": torch.rand(50_001, generator=gen) > 0.5,
        "half": torch.randn(70_000, generator=gen).to(torch.bfloat16),
        "ints": torch.arange(40_000, dtype=torch.int64),
        "empty": torch.empty(0, 5),
        "small": torch.tensor([1.5, -2.0]),
        "view": big[10:20],  # shares storage with "big": stored once
    }


def test_parallel_copy_fills_the_staging_buffer_exactly(forced_helpers: None) -> None:
    original = state()
    _, leaves = flatten(original)
    payload = plan(leaves)
    expected = {e.name: _bytes_of(e.source) for e in payload.entries}  # before the copy
    assert max(e.nbytes for e in payload.entries) > 50 * _snapshot.COPY_PIECE
    snapshot = _snapshot.take(payload, _snapshot.StagingPool())
    for entry in payload.entries:
        assert bytes(snapshot.entry_view(entry)) == expected[entry.name], entry.name


def _bytes_of(tensor: torch.Tensor) -> bytes:
    """The bytes a copy must produce, by torch alone: contiguous, bools as bytes."""
    flat = tensor.contiguous()
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_the_copy_runs_on_the_helper_threads(
    forced_helpers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[str] = set()
    real = _snapshot._cpu_pieces

    def pieces(target: torch.Tensor, entry: object) -> list:
        def traced(job: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                threads.add(threading.current_thread().name)
                job()

            return run

        return [traced(job) for job in real(target, entry)]  # type: ignore[arg-type]

    monkeypatch.setattr(_snapshot, "_cpu_pieces", pieces)
    _, leaves = flatten(state())
    _snapshot.take(plan(leaves), _snapshot.StagingPool())
    assert threading.current_thread().name in threads  # the caller takes a lane too
    assert any(name.startswith("ckptstore-copy") for name in threads)


def test_saved_state_round_trips_with_helpers(forced_helpers: None, tmp_path: Path) -> None:
    original = state()
    ckptstore.save(tmp_path / "c", original)
    loaded = ckptstore.load(tmp_path / "c")
    for key, value in original.items():
        assert isinstance(value, torch.Tensor)
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def test_a_failing_helper_copy_fails_the_snapshot(
    forced_helpers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = _snapshot._cpu_pieces

    def pieces(target: torch.Tensor, entry: object) -> list:
        jobs = real(target, entry)  # type: ignore[arg-type]
        calls["n"] += 1

        def broken() -> None:
            raise RuntimeError("copy failed")

        return [*jobs, broken] if calls["n"] == 1 else jobs

    monkeypatch.setattr(_snapshot, "_cpu_pieces", pieces)
    _, leaves = flatten(state())
    with pytest.raises(RuntimeError, match="copy failed"):
        _snapshot.take(plan(leaves), _snapshot.StagingPool())


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_helpers_are_remade_in_a_forked_child(forced_helpers: None, tmp_path: Path) -> None:
    original = state()  # (built here: torch ops in a forked child can hang in OpenMP)
    ckptstore.save(tmp_path / "parent", original)  # the parent's helper threads exist now
    pid = os.fork()
    if pid == 0:  # the child has none of them; a save must not wait for dead threads
        faulthandler.dump_traceback_later(60, exit=True)  # a hang fails, not blocks
        try:
            ckptstore.save(tmp_path / "child", original)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    loaded = ckptstore.load(tmp_path / "child")
    assert torch.equal(loaded["big"], original["big"])


def test_no_helpers_when_torch_uses_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: os.cpu_count() or 1)
    assert _snapshot._helpers.count() == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert _snapshot._helpers.count() == (os.cpu_count() or 1) - 1
