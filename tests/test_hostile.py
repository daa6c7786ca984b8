"""Hostile files: what an attacker (who can also recompute every checksum) puts in a run.

Manifests naming files outside the checkpoint, links leading out of the run directory,
absurd sizes and shapes, invalid JSON, a future format version, a payload that is a
pickle: `load` and `verify` refuse with a clear error, read and write nothing outside
the run directory, and execute nothing.

"Read nothing outside" is checked by making what lies outside a perfect copy of what
the link or name pretends it is: had the library followed it, the load would succeed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import tree_bytes

import ckptstore
from ckptstore import CheckpointManager
from ckptstore._manifest import encode_manifest, hash_bytes
from ckptstore.errors import CkptError, CorruptCheckpointError, FormatVersionError

STEP1 = "step-000000001"


def state_of(step: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(16, 16, generator=gen), "step": step}


class _Evil:
    """Unpickling this creates a directory: proof that something executed it."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.mkdir, (self.target,)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="ckptstore")


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """A run with steps 1 and 2, and beside it an 'outside' holding copies of them."""
    run = tmp_path / "run"
    with CheckpointManager(run, threads=1) as manager:
        manager.save(1, state_of(1))
        manager.save(2, state_of(2))
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(run / STEP1, outside / STEP1)
    (outside / "secret").write_bytes(b"do not touch")
    return {"run": run, "outside": outside, "sentinel": tmp_path / "pwned"}


def rewrite_manifest(checkpoint: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a manifest and sign it again, as an attacker can."""
    path = checkpoint / "manifest.json"
    body = json.loads(path.read_text())
    del body["checksum"]
    change(body)
    path.write_bytes(encode_manifest(body))


def assert_refused(site: dict[str, Path], name: str = STEP1, step: int = 1) -> str:
    """verify and load refuse `name`; returns the error message (for its clarity)."""
    run = site["run"]
    outside = tree_bytes(site["outside"])
    # Quick verification checks the manifest, the header and the sizes; whether each
    # shape agrees with its byte count is for deep verification (and load) to find.
    report = ckptstore.verify(run / name, deep=True)
    assert not report.sound
    with pytest.raises((CkptError, OSError)) as caught:
        ckptstore.load(run / name)
    with CheckpointManager(run, read_only=True) as manager:
        with pytest.raises((CkptError, OSError)):
            manager.load(step)
        assert manager.load()["step"] != step or step == 2  # resume skips it
    assert tree_bytes(site["outside"]) == outside
    assert not site["sentinel"].exists()
    return str(caught.value)


def _payload_name(body: dict[str, Any]) -> str:
    (name,) = body["files"]
    return str(name)


@pytest.mark.parametrize("evil", ["../../outside/x", "../outside", "/etc/passwd", "..", "a/b"])
def test_payload_names_leaving_the_checkpoint_are_refused(site: dict[str, Path], evil: str) -> None:
    def change(body: dict[str, Any]) -> None:
        body["files"][evil] = body["files"].pop(_payload_name(body))
        for entry in body["entries"].values():
            entry["file"] = evil

    rewrite_manifest(site["run"] / STEP1, change)
    message = assert_refused(site)
    assert "not a plain file name" in message


def test_a_payload_replaced_by_a_link_out_is_refused(site: dict[str, Path]) -> None:
    payload = site["run"] / STEP1 / "payload.safetensors"
    payload.unlink()
    payload.symlink_to(site["outside"] / STEP1 / "payload.safetensors")  # a perfect copy
    assert_refused(site)


def test_a_checkpoint_that_is_a_link_out_is_not_a_checkpoint(site: dict[str, Path]) -> None:
    run = site["run"]
    shutil.rmtree(run / STEP1)
    (run / STEP1).symlink_to(site["outside"] / STEP1)
    message = assert_refused(site)
    assert "directory" in message
    with CheckpointManager(run, read_only=True) as manager:
        assert manager.steps() == [2]


def test_pointers_out_of_the_run_are_never_followed(site: dict[str, Path]) -> None:
    run, elsewhere = site["run"], site["outside"].parent / "elsewhere"
    with CheckpointManager(elsewhere, threads=1) as other:
        other.save(99, state_of(99))
    for pointer in ("best", "latest"):
        (run / pointer).unlink(missing_ok=True)
        (run / pointer).symlink_to(f"../elsewhere/step-{99:09d}")
    with CheckpointManager(run, read_only=True) as manager:
        assert manager.load("latest")["step"] == 2  # by the manifests, not the link
        assert manager.load()["step"] == 2
    before = tree_bytes(elsewhere)
    with CheckpointManager(run, threads=1) as manager:  # a writer repairs the pointers
        manager.save(3, state_of(3))
    assert os.readlink(run / "latest") == "step-000000003"
    assert tree_bytes(elsewhere) == before


def test_leftovers_linking_out_are_unlinked_not_followed(site: dict[str, Path]) -> None:
    run = site["run"]
    (run / ".tmp-evil").symlink_to(site["outside"])
    (run / ".trash-evil").mkdir()
    (run / ".trash-evil" / "link").symlink_to(site["outside"])
    before = tree_bytes(site["outside"])
    with CheckpointManager(run, keep_last=1, threads=1) as manager:
        manager.save(3, state_of(3))  # retention deletes steps 1 and 2 too
    assert sorted(os.listdir(run)) == [".lock", ".lock.owner", "latest", "step-000000003"]
    assert tree_bytes(site["outside"]) == before


@pytest.mark.parametrize(
    "what",
    ["huge-shape", "huge-nbytes", "huge-chunk", "huge-file", "negative", "deep-nesting"],
)
def test_absurd_sizes_and_shapes_are_refused(site: dict[str, Path], what: str) -> None:
    def change(body: dict[str, Any]) -> None:
        entry = body["entries"]["w"]
        record = body["files"][_payload_name(body)]
        if what == "huge-shape":
            entry["shape"] = body["tensors"]["w"]["shape"] = [2**40, 2**40]
        elif what == "huge-nbytes":
            entry["nbytes"] = 2**61
        elif what == "huge-chunk":
            record["chunks"][-1][1] = 2**40
            record["raw_size"] += 2**40
        elif what == "huge-file":
            record["size"] = record["raw_size"] = 2**60
        elif what == "negative":
            entry["offset"] = -8

    if what == "deep-nesting":  # not even the attacker's json.dumps can sign this one
        nested = "[" * 100_000 + "]" * 100_000
        text = f'{{"format": "ckptstore", "format_version": 1, "state": {nested}}}'
        (site["run"] / STEP1 / "manifest.json").write_text(text)
    else:
        rewrite_manifest(site["run"] / STEP1, change)
    assert_refused(site)


def test_invalid_json_and_future_versions_are_refused(site: dict[str, Path]) -> None:
    manifest = site["run"] / STEP1 / "manifest.json"
    manifest.write_text('{"format": "ckptstore", "format_version": 1, ')
    assert "not valid JSON" in assert_refused(site)

    body = {"format": "ckptstore", "format_version": 2, "step": 1}
    manifest.write_bytes(encode_manifest(body))
    with pytest.raises(FormatVersionError, match="upgrade ckptstore"):
        ckptstore.load(site["run"] / STEP1)
    assert_refused(site)


def test_a_pickle_posing_as_the_payload_is_never_executed(site: dict[str, Path]) -> None:
    checkpoint = site["run"] / STEP1
    payload = checkpoint / "payload.safetensors"
    size = payload.stat().st_size
    evil = pickle.dumps(_Evil(str(site["sentinel"])))
    assert len(evil) <= size
    forged = evil + b"\0" * (size - len(evil))  # pickle stops at STOP: padding is ignored
    payload.write_bytes(forged)

    def change(body: dict[str, Any]) -> None:  # make every chunk checksum agree
        record = body["files"][_payload_name(body)]
        for chunk in record["chunks"]:
            chunk[5] = hash_bytes(forged[chunk[2] : chunk[2] + chunk[3]])

    rewrite_manifest(checkpoint, change)
    with pytest.raises(CorruptCheckpointError):
        ckptstore.load(checkpoint)
    assert_refused(site)
    pickle.loads(forged)  # the forged file really was armed
    assert site["sentinel"].exists()
