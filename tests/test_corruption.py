"""Corrupted payloads: byte flips, truncation, zero length, deletion.

Deep verification must notice every case; `load(step=N)` of the damaged checkpoint
raises a clear error (or, for a flip in bytes no tensor uses, returns exactly the saved
state: never wrong data); `load()` falls back to the previous sound checkpoint.
Exhaustive flips of manifests and headers live in tests/test_verify_cases.py.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptstore
from ckptstore import CheckpointManager
from ckptstore._read import read_manifest
from ckptstore._storage import LocalStorage
from ckptstore.errors import CheckpointNotFoundError, CorruptCheckpointError

FLIPS = 24  # random single-byte flips per codec


def state_of(step: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(48, 48, generator=gen),
        "h": torch.randn(300, generator=gen).to(torch.bfloat16),
        "i": torch.arange(step, step + 100),
        "step": step,
    }


def same_state(a: Any, b: Any) -> bool:
    return a["step"] == b["step"] and all(
        torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in ("w", "h", "i")
    )


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="ckptstore")


@pytest.fixture(params=["zstd", "none"])
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "run"
    with CheckpointManager(path, codec=request.param, chunk_size=4096, threads=1) as manager:
        for step in (1, 2, 3):
            manager.save(step, state_of(step))
    return path


def payload_of(run: Path, step: int) -> Path:
    manifest = read_manifest(LocalStorage(run), f"step-{step:09d}")
    (name,) = manifest.files
    return run / f"step-{step:09d}" / name


def data_ranges(run: Path, step: int) -> list[tuple[int, int]]:
    """Stored byte ranges holding some tensor's bytes (every chunk but the header's)."""
    manifest = read_manifest(LocalStorage(run), f"step-{step:09d}")
    (record,) = manifest.files.values()
    return [
        (c.stored_offset, c.stored_offset + c.stored_len)
        for c in record.chunks
        if c.raw_offset >= record.header_size
    ]


def assert_damage_handled(run: Path, must_raise: bool) -> None:
    report = ckptstore.verify(run / "step-000000003", deep=True)
    assert not report.sound, "deep verify missed the damage"
    assert report.problems[0].reason
    with CheckpointManager(run, read_only=True) as manager:
        try:
            loaded = manager.load(3)
        except (CorruptCheckpointError, CheckpointNotFoundError) as error:
            assert "step-000000003" in str(error) or "step 3" in str(error)
        else:
            assert not must_raise, "load(step=3) returned a damaged checkpoint"
            assert same_state(loaded, state_of(3)), "load returned wrong data"
        fallback = manager.load()
        assert fallback is not None
        assert fallback["step"] in (2, 3)
        assert same_state(fallback, state_of(fallback["step"]))
        # loaded_step says which one came back, even where load_step() (manifests only)
        # named the damaged one
        assert manager.loaded_step == fallback["step"]
        if must_raise:
            assert fallback["step"] == 2


def test_random_byte_flips_in_chunks_are_caught(run: Path) -> None:
    payload = payload_of(run, 3)
    size = payload.stat().st_size
    data = data_ranges(run, 3)
    rng = random.Random(8)
    positions = [rng.randrange(size) for _ in range(FLIPS)]
    positions += [rng.randrange(lo, hi) for lo, hi in rng.sample(data, min(4, len(data)))]
    for position in positions:
        original = payload.read_bytes()
        damaged = bytearray(original)
        damaged[position] ^= 1 << rng.randrange(8)
        payload.write_bytes(damaged)
        try:
            in_data = any(lo <= position < hi for lo, hi in data)
            assert_damage_handled(run, must_raise=in_data)
        finally:
            payload.write_bytes(original)
    assert ckptstore.verify(run / "step-000000003", deep=True).sound


@pytest.mark.parametrize("how", ["truncate", "zero-length", "delete", "extend"])
def test_truncated_empty_or_missing_payload_is_caught(run: Path, how: str) -> None:
    payload = payload_of(run, 3)
    data = payload.read_bytes()
    if how == "truncate":
        payload.write_bytes(data[: len(data) * 2 // 3])
    elif how == "zero-length":
        payload.write_bytes(b"")
    elif how == "delete":
        payload.unlink()
    else:
        payload.write_bytes(data + b"\0" * 64)
    assert_damage_handled(run, must_raise=True)
    assert not ckptstore.verify(run / "step-000000003").sound  # quick verify sees it too


def test_a_deleted_manifest_hides_the_checkpoint(run: Path) -> None:
    (run / "step-000000003" / "manifest.json").unlink()
    report = ckptstore.verify(run / "step-000000003", deep=True)
    assert report.status == "incomplete"
    with CheckpointManager(run, read_only=True) as manager:
        with pytest.raises(CheckpointNotFoundError, match="step 3"):
            manager.load(3)
        assert manager.load()["step"] == 2


def test_a_damaged_checkpoint_never_stops_a_new_save(run: Path) -> None:
    os.truncate(payload_of(run, 3), 10)
    with CheckpointManager(run, threads=1) as manager:
        assert manager.load()["step"] == 2
        assert manager.steps() == [1, 2]
        manager.save(4, state_of(4)).wait()
        assert manager.load()["step"] == 4


def test_corruption_messages_say_where_the_damaged_range_starts() -> None:
    error = CorruptCheckpointError("chunk checksum mismatch", checkpoint="c", file="f", offset=7)
    assert str(error) == "chunk checksum mismatch (checkpoint c, file f, starting at byte 7)"
