"""`verify`, quick and deep, against one damage at a time: status, exit status and reason.

Every case builds a small run, damages it with plain file operations, and checks
what `ckptstore verify` (in-process, `--json`) reports. The exhaustive byte-flip cases
call the library's `verify_checkpoint` directly, for speed.

Expected values come from the damage, never from the verifier: offsets and sizes are
read from the manifest JSON with `json`, checksums recomputed here with `xxhash`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

from ckptstore import CheckpointManager, save
from ckptstore._storage import LocalStorage
from ckptstore._verify import verify_checkpoint
from ckptstore.cli import main

CODECS = ["none", "zstd"]
MODES = [pytest.param(False, id="quick"), pytest.param(True, id="deep")]
PAYLOAD = {"none": "payload.safetensors", "zstd": "payload.safetensors.zst"}


def small_state() -> dict[str, Any]:
    torch.manual_seed(0)
    w = torch.randn(8, 8)
    return {"w": w, "tied": w, "b": torch.arange(5, dtype=torch.int64), "lr": 1e-05}


def make_run(tmp_path: Path, codec: str, steps: tuple[int, ...] = (10, 20)) -> Path:
    run = tmp_path / "run"
    with CheckpointManager(run, keep_last=5, metric="loss", codec=codec, chunk_size=4096) as m:
        for step in steps:
            m.save(step, small_state(), metrics={"loss": 1.0 / step})
    return run


def manifest_of(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "manifest.json").read_text())


def verify_json(path: Path, deep: bool, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    capsys.readouterr()
    code = main(["verify", str(path), "--json", *(["--deep"] if deep else [])])
    return code, json.loads(capsys.readouterr().out)


def only_problem(report: dict[str, Any], name: str) -> dict[str, Any]:
    (checked,) = [c for c in report["checkpoints"] if c["path"].endswith(name)]
    assert checked["problems"], checked
    return checked


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


# -- whole-file damage -------------------------------------------------------------------
@pytest.mark.parametrize("deep", MODES)
@pytest.mark.parametrize("codec", CODECS)
def test_truncated_payload_is_corrupt(tmp_path: Path, codec: str, deep: bool, capsys) -> None:
    run = make_run(tmp_path, codec)
    payload = run / "step-000000020" / PAYLOAD[codec]
    size = payload.stat().st_size
    os.truncate(payload, size // 2)
    code, report = verify_json(run, deep, capsys)
    assert (code, report["status"]) == (1, "corrupt")
    checked = only_problem(report, "step-000000020")
    assert checked["status"] == "corrupt"
    assert f"{size // 2} bytes" in checked["problems"][0]["reason"]
    assert PAYLOAD[codec] in checked["problems"][0]["file"]
    other = only_ok(report, "step-000000010")
    assert other["status"] == "sound"


def only_ok(report: dict[str, Any], name: str) -> dict[str, Any]:
    (checked,) = [c for c in report["checkpoints"] if c["path"].endswith(name)]
    return checked


@pytest.mark.parametrize("deep", MODES)
@pytest.mark.parametrize("codec", CODECS)
def test_zero_length_payload_is_corrupt(tmp_path: Path, codec: str, deep: bool, capsys) -> None:
    run = make_run(tmp_path, codec)
    payload = run / "step-000000010" / PAYLOAD[codec]
    expected = manifest_of(payload.parent)["files"][PAYLOAD[codec]]["size"]
    payload.write_bytes(b"")
    code, report = verify_json(run, deep, capsys)
    assert (code, report["status"]) == (1, "corrupt")
    problem = only_problem(report, "step-000000010")["problems"][0]
    assert f"is 0 bytes, the manifest records {expected}" in problem["reason"]


@pytest.mark.parametrize("deep", MODES)
@pytest.mark.parametrize("codec", CODECS)
def test_deleted_payload_is_incomplete(tmp_path: Path, codec: str, deep: bool, capsys) -> None:
    run = make_run(tmp_path, codec)
    (run / "step-000000020" / PAYLOAD[codec]).unlink()
    code, report = verify_json(run, deep, capsys)
    assert (code, report["status"]) == (1, "incomplete")
    checked = only_problem(report, "step-000000020")
    assert checked["status"] == "incomplete"
    assert "missing" in checked["problems"][0]["reason"]
    assert checked["problems"][0]["file"] == PAYLOAD[codec]


# -- one byte in a data chunk ---------------------------------------------------------------
@pytest.mark.parametrize("codec", CODECS)
def test_flipped_chunk_byte_is_found_by_deep_only(tmp_path: Path, codec: str, capsys) -> None:
    run = make_run(tmp_path, codec)
    ckpt = run / "step-000000020"
    record = manifest_of(ckpt)["files"][PAYLOAD[codec]]
    # The last chunk lies wholly in the data section (after the header).
    raw_offset, _, stored_offset, stored_len, _, _ = record["chunks"][-1]
    assert raw_offset >= record["header_size"]
    flip(ckpt / PAYLOAD[codec], stored_offset + stored_len // 2)

    # Quick reads only the manifest and the header: by design, it cannot see this.
    code, report = verify_json(ckpt, False, capsys)
    assert (code, report["status"]) == (0, "sound")

    code, report = verify_json(ckpt, True, capsys)
    assert (code, report["status"]) == (1, "corrupt")
    first = report["problems"][0]
    assert first["reason"].startswith("chunk checksum mismatch")
    assert first["offset"] == stored_offset
    assert first["file"].endswith(PAYLOAD[codec])
    # ...and the tensors the chunk holds are named too (the run report as well).
    assert any(p["key"] is not None for p in report["problems"])
    code, run_report = verify_json(run, True, capsys)
    assert (code, run_report["status"]) == (1, "corrupt")


# -- the manifest: sizes edited ---------------------------------------------------------------
def sign(body: dict[str, Any]) -> bytes:
    """What an attacker (or a careless tool) does: recompute the manifest's checksum."""
    body = {k: v for k, v in body.items() if k != "checksum"}
    canonical = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    body["checksum"] = "xxh3-64:" + xxhash.xxh3_64_hexdigest(canonical.encode())
    return (json.dumps(body, indent=1, ensure_ascii=False) + "\n").encode()


@pytest.mark.parametrize("deep", MODES)
@pytest.mark.parametrize("codec", CODECS)
def test_edited_size_fails_the_manifest_checksum(tmp_path: Path, codec, deep, capsys) -> None:
    run = make_run(tmp_path, codec)
    ckpt = run / "step-000000020"
    text = (ckpt / "manifest.json").read_text()
    size = manifest_of(ckpt)["files"][PAYLOAD[codec]]["size"]
    edited = text.replace(f'"size": {size},', f'"size": {size + 1},', 1)
    assert edited != text
    (ckpt / "manifest.json").write_text(edited)
    code, report = verify_json(run, deep, capsys)
    assert (code, report["status"]) == (1, "corrupt")
    problem = only_problem(report, "step-000000020")["problems"][0]
    assert "manifest checksum mismatch" in problem["reason"]


@pytest.mark.parametrize("deep", MODES)
@pytest.mark.parametrize("codec", CODECS)
def test_edited_size_with_recomputed_checksum_is_caught(tmp_path, codec, deep, capsys) -> None:
    run = make_run(tmp_path, codec)
    ckpt = run / "step-000000020"

    # Only the file size: the chunk table no longer adds up to it.
    body = manifest_of(ckpt)
    body["files"][PAYLOAD[codec]]["size"] += 7
    (ckpt / "manifest.json").write_bytes(sign(body))
    code, report = verify_json(run, deep, capsys)
    assert (code, report["status"]) == (1, "corrupt")
    problem = only_problem(report, "step-000000020")["problems"][0]
    assert "chunks do not add up" in problem["reason"]

    # The size and the last chunk's stored length, consistently: the file itself disagrees.
    body = manifest_of(ckpt)  # the forged manifest from above, made consistent
    record = body["files"][PAYLOAD[codec]]
    record["chunks"][-1][3] += 7
    (ckpt / "manifest.json").write_bytes(sign(body))
    real = (ckpt / PAYLOAD[codec]).stat().st_size
    code, report = verify_json(run, deep, capsys)
    assert (code, report["status"]) == (1, "corrupt")
    problem = only_problem(report, "step-000000020")["problems"][0]
    assert f"payload is {real} bytes, the manifest records {real + 7}" in problem["reason"]


# -- pointers and leftovers -------------------------------------------------------------------
@pytest.mark.parametrize("deep", MODES)
@pytest.mark.parametrize("codec", CODECS)
def test_dangling_best_link_is_reported(tmp_path: Path, codec: str, deep: bool, capsys) -> None:
    run = make_run(tmp_path, codec)
    os.unlink(run / "best")
    os.symlink("step-000000099", run / "best")
    code, report = verify_json(run, deep, capsys)
    assert (code, report["status"]) == (1, "incomplete")
    assert all(c["status"] == "sound" for c in report["checkpoints"])
    best = {p["name"]: p for p in report["pointers"]}["best"]
    assert (best["status"], best["target"]) == ("dangling", "step-000000099")
    assert "does not exist" in best["reason"]
    assert [p["file"] for p in report["problems"]] == ["best"]


@pytest.mark.parametrize("deep", MODES)
@pytest.mark.parametrize("codec", CODECS)
def test_leftover_temporary_directory_is_not_an_error(tmp_path, codec, deep, capsys) -> None:
    run = make_run(tmp_path, codec)
    leftover = run / ".tmp-step-000000030-0123456789ab"
    shutil.copytree(run / "step-000000020", leftover)
    (leftover / "manifest.json").unlink()  # a crash before the manifest
    code, report = verify_json(run, deep, capsys)
    assert (code, report["status"]) == (0, "sound")
    assert report["leftovers"] == [leftover.name]
    assert len(report["checkpoints"]) == 2


# -- exhaustive byte flips ------------------------------------------------------------------
JSON_WHITESPACE = frozenset(b" \t\n\r")
MASKS = (0x01, 0x20, 0x2A)  # low bit (digits stay digits), case bit, LF <-> space


def flips(path: Path, positions: range, storage: LocalStorage, name: str):
    """Flip each byte in `positions` with each mask, verify quick and deep, restore."""
    fd = os.open(path, os.O_RDWR)
    try:
        for at in positions:
            (original,) = os.pread(fd, 1, at)
            for mask in MASKS:
                os.pwrite(fd, bytes([original ^ mask]), at)
                quick = verify_checkpoint(storage, name, deep=False)
                deep = verify_checkpoint(storage, name, deep=True)
                yield at, original, mask, quick, deep
            os.pwrite(fd, bytes([original]), at)
    finally:
        os.close(fd)


@pytest.mark.parametrize("codec", CODECS)
def test_every_manifest_byte_flip_is_caught_unless_meaningless(tmp_path: Path, codec) -> None:
    ckpt = tmp_path / "ckpt"
    save(ckpt, small_state(), step=3, metrics={"loss": 2.5e-07}, codec=codec, chunk_size=4096)
    path = ckpt / "manifest.json"
    original = path.read_bytes()
    meaning = json.loads(original)
    storage = LocalStorage(tmp_path)
    passed = []
    for at, byte, mask, quick, deep in flips(path, range(len(original)), storage, "ckpt"):
        assert quick.status == deep.status, (at, mask)
        if quick.sound:
            passed.append((at, byte, mask))
            continue
        assert quick.status == "corrupt", (at, mask, quick)
        assert "manifest" in quick.problems[0].reason, (at, mask, quick.problems)
    # A flip may pass only where it leaves the manifest's meaning as it was: JSON
    # whitespace turned into other whitespace (LF <-> space), or the exponent marker of a
    # number changing case (2.5e-07 and 2.5E-07 are one number). Everywhere else it fails.
    for at, byte, mask in passed:
        damaged = bytearray(original)
        damaged[at] ^= mask
        assert json.loads(bytes(damaged)) == meaning, at
        exponent = byte in b"eE" and original[at - 1 : at].isdigit()
        assert byte in JSON_WHITESPACE or exponent, (at, chr(byte), mask)
    assert any(byte in JSON_WHITESPACE for _, byte, _ in passed)  # the LF <-> space case ran
    assert verify_checkpoint(storage, "ckpt", deep=True).sound  # restored intact


@pytest.mark.parametrize("codec", CODECS)
def test_every_payload_header_byte_flip_is_caught(tmp_path: Path, codec: str) -> None:
    ckpt = tmp_path / "ckpt"
    save(ckpt, small_state(), step=3, codec=codec, chunk_size=4096)
    record = json.loads((ckpt / "manifest.json").read_text())["files"][PAYLOAD[codec]]
    header_chunks = [c for c in record["chunks"] if c[0] < record["header_size"]]
    # Stored bytes of the header: the plain header itself, or its compressed chunk(s).
    end = sum(c[3] for c in header_chunks)
    assert end == (record["header_size"] if codec == "none" else end) and end > 8
    storage = LocalStorage(tmp_path)
    count = 0
    for at, _, mask, quick, deep in flips(ckpt / PAYLOAD[codec], range(end), storage, "ckpt"):
        for report in (quick, deep):
            assert report.status == "corrupt", (at, mask, report.deep)
            problem = report.problems[0]
            assert problem.file is not None and problem.file.endswith(PAYLOAD[codec])
            assert problem.offset is not None and problem.offset < end, (at, problem)
        count += 1
    assert count == end * len(MASKS)
    assert verify_checkpoint(storage, "ckpt", deep=True).sound
