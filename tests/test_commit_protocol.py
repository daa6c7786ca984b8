"""The commit protocol under faults, and the order of its durability steps.

A fault-injecting storage (tests/faults.py) wraps a real LocalStorage: what it leaves
on disk is what a real failure would leave. The order check reads the storage calls
the commit made; a mutant commit without the directory fsync proves it can fail.
"""

from __future__ import annotations

import errno
import inspect
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import Call, FaultyStorage, os_error, route_saves_through, tree_bytes

import ckptstore
from ckptstore import _commit
from ckptstore._api import prepare
from ckptstore._format import CodecConfig
from ckptstore._snapshot import StagingPool
from ckptstore._workers import WorkerPool


def make_state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    return {"w": torch.randn(256, 256, generator=gen), "b": torch.randn(7, generator=gen)}


def bits(t: torch.Tensor) -> bytes:
    return t.reshape(-1).numpy().tobytes()


@pytest.fixture
def previous(tmp_path: Path) -> dict[str, Any]:
    """A committed checkpoint `step-1`, and the bytes of every file under tmp_path."""
    state = {"w": torch.full((64, 64), 3.0), "step": 1}
    ckptstore.save(tmp_path / "step-1", state, step=1)
    return {"state": state, "files": tree_bytes(tmp_path)}


def assert_previous_intact(tmp_path: Path, previous: dict[str, Any]) -> None:
    assert tree_bytes(tmp_path / "step-1") == {
        k.removeprefix("step-1/"): v for k, v in previous["files"].items()
    }
    loaded = ckptstore.load(tmp_path / "step-1")
    assert bits(loaded["w"]) == bits(previous["state"]["w"])


def commit_with(storage: Any, name: str, state: Any, commit: Any = None) -> Any:
    build = prepare(storage, name, state, step=2, metrics=None, metadata=None, codec=CodecConfig())
    pool = WorkerPool(2)
    try:
        return (commit or _commit.commit)(build(StagingPool(keep=0)), pool)
    finally:
        pool.close()


# --- faults ---------------------------------------------------------------------------------


def test_enospc_half_way_through_the_payload(
    tmp_path: Path, previous: dict[str, Any], monkeypatch: Any
) -> None:
    payload_size = 256 * 256 * 4
    storage = FaultyStorage(tmp_path, enospc_after=payload_size // 2)
    route_saves_through(monkeypatch, storage)

    with pytest.raises(OSError) as caught:
        ckptstore.save(tmp_path / "step-2", make_state(), step=2)

    assert caught.value.errno == errno.ENOSPC
    assert 0 < storage.written < payload_size  # the fault hit mid-payload
    assert sorted(os.listdir(tmp_path)) == ["step-1"]  # no final name, no temp left
    assert_previous_intact(tmp_path, previous)


def test_enospc_while_writing_the_manifest(tmp_path: Path, previous: dict[str, Any]) -> None:
    storage = FaultyStorage(tmp_path, enospc_after=256 * 256 * 4 + 600)
    with pytest.raises(OSError) as caught:
        commit_with(storage, "step-2", make_state())
    assert caught.value.errno == errno.ENOSPC
    assert any(c[0] == "write" and c[1].endswith("manifest.json") for c in storage.calls)
    assert sorted(os.listdir(tmp_path)) == ["step-1"]
    assert_previous_intact(tmp_path, previous)


def _count_calls(tmp_path: Path) -> int:
    probe = FaultyStorage(tmp_path / "probe")
    os.mkdir(probe.root)
    commit_with(probe, "ck", make_state())
    return len([c for c in probe.calls if c[0] != "close"])  # close cannot fail here


def test_a_failure_at_any_storage_call_leaves_nothing_partial(
    tmp_path: Path, previous: dict[str, Any]
) -> None:
    total = _count_calls(tmp_path)
    assert total >= 8
    for k in range(total):
        seen: list[Call] = []

        def fail_kth(call: Call, k: int = k, seen: list[Call] = seen) -> BaseException | None:
            seen.append(call)
            return os_error(errno.EIO) if len(seen) == k + 1 else None

        storage = FaultyStorage(tmp_path, fail=fail_kth)
        with pytest.raises(OSError):
            commit_with(storage, "step-2", make_state())
        failed = seen[k]
        names = set(os.listdir(tmp_path)) - {"probe"}
        if "step-2" in names:  # only a failure after the rename may leave it: whole
            assert failed == ("fsync_dir", "."), failed
            assert ckptstore.verify(tmp_path / "step-2", deep=True).status == "sound"
            loaded = ckptstore.load(tmp_path / "step-2")
            assert bits(loaded["w"]) == bits(make_state()["w"])
            ckptstore_rm(tmp_path / "step-2")
        assert set(os.listdir(tmp_path)) - {"probe"} == {"step-1"}, failed
        assert_previous_intact(tmp_path, previous)


def ckptstore_rm(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.mark.parametrize("target", ["payload.safetensors", "manifest.json"])
def test_eio_from_fsync_is_never_retried(tmp_path: Path, target: str) -> None:
    def eio(call: Call) -> BaseException | None:
        is_target = call[0] == "fsync" and call[1].endswith(target)
        return os_error(errno.EIO, call[1]) if is_target else None

    storage = FaultyStorage(tmp_path, fail=eio)
    with pytest.raises(OSError) as caught:
        commit_with(storage, "ck", make_state())
    assert caught.value.errno == errno.EIO
    assert len([c for c in storage.ops("fsync") if c[1].endswith(target)]) == 1
    assert os.listdir(tmp_path) == []

    storage.fail = None  # the disk recovers: the next save writes everything again
    commit_with(storage, "ck", make_state())
    assert bits(ckptstore.load(tmp_path / "ck")["w"]) == bits(make_state()["w"])


def test_an_existing_checkpoint_is_never_replaced(tmp_path: Path, previous: dict[str, Any]) -> None:
    with pytest.raises(FileExistsError):
        ckptstore.save(tmp_path / "step-1", make_state())
    assert sorted(os.listdir(tmp_path)) == ["step-1"]
    assert_previous_intact(tmp_path, previous)


# --- durability order -----------------------------------------------------------------------


def durability_violations(calls: list[Call], final: str) -> list[str]:
    """What is wrong with the order of a commit's storage calls, per DESIGN.md."""

    def first(call: Call) -> int:
        return calls.index(call) if call in calls else -1

    problems = []
    renames = [c for c in calls if c[0] == "rename" and c[2] == final]
    if len(renames) != 1:
        return [f"expected one rename to {final!r}, got {renames}"]
    rename_at = calls.index(renames[0])
    tmp = renames[0][1]
    files = [c[1] for c in calls if c[0] == "create" and c[1].startswith(f"{tmp}/")]
    manifest = f"{tmp}/manifest.json"
    if manifest not in files:
        problems.append("no manifest written")
    for path in files:
        fsync = first(("fsync", path))
        writes = [i for i, c in enumerate(calls) if c[0] == "write" and c[1] == path]
        if fsync < 0:
            problems.append(f"{path} never fsynced")
        elif writes and max(writes) > fsync:
            problems.append(f"{path} written after its fsync")
        if path != manifest and manifest in files and fsync > first(("create", manifest)):
            problems.append(f"manifest created before {path} was fsynced")
    dir_fsync = first(("fsync_dir", tmp))
    if dir_fsync < 0:
        problems.append("temporary directory never fsynced")
    elif dir_fsync < first(("fsync", manifest)) or dir_fsync > rename_at:
        problems.append("directory fsync not between the manifest fsync and the rename")
    if max([first(("fsync", f)) for f in files], default=-1) > rename_at:
        problems.append("a file fsynced after the rename")
    parent = [i for i, c in enumerate(calls) if c == ("fsync_dir", ".")]
    if not any(i > rename_at for i in parent):
        problems.append("parent directory not fsynced after the rename")
    return problems


def test_commit_follows_the_durability_order(tmp_path: Path) -> None:
    storage = FaultyStorage(tmp_path)
    commit_with(storage, "ck", make_state())
    assert durability_violations(storage.calls, "ck") == []


def _mutant_commit(drop: str) -> Any:
    """`_commit.commit` with the source line `drop` removed (the mutation under test)."""
    source = textwrap.dedent(inspect.getsource(_commit.commit))
    lines = source.splitlines()
    kept = [line for line in lines if line.strip() != drop]
    assert len(kept) == len(lines) - 1, f"mutation target {drop!r} not found in commit()"
    namespace = dict(vars(_commit))
    exec(compile("\n".join(kept), _commit.__file__, "exec"), namespace)
    return namespace["commit"]


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        ("storage.fsync_dir(tmp)", "temporary directory never fsynced"),
        ('storage.fsync_dir(".")', "parent directory not fsynced after the rename"),
        ("handle.fsync()", "payload.safetensors never fsynced"),
    ],
)
def test_the_order_check_catches_a_commit_missing_an_fsync(
    tmp_path: Path, drop: str, expected: str
) -> None:
    storage = FaultyStorage(tmp_path)
    commit_with(storage, "ck", make_state(), commit=_mutant_commit(drop))
    problems = durability_violations(storage.calls, "ck")
    assert any(expected in p for p in problems), problems


def test_the_order_check_catches_a_storage_that_skips_the_directory_fsync(
    tmp_path: Path,
) -> None:
    storage = FaultyStorage(tmp_path, skip_dir_fsync=lambda path: path != ".")
    commit_with(storage, "ck", make_state())
    assert durability_violations(storage.calls, "ck") == ["temporary directory never fsynced"]
