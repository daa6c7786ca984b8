"""The `ckptstore` command, in-process through `main([...])`, and once as a console script."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckptstore
from ckptstore import CheckpointManager
from ckptstore.cli import main

LOSSES = {10: 0.9, 20: 0.3, 30: 0.5, 40: 0.7, 50: float("nan")}


def make_run(tmp_path: Path, codec: str = "zstd") -> Path:
    run = tmp_path / "run"
    with CheckpointManager(run, metric="loss", codec=codec) as m:  # keep everything
        for step, loss in LOSSES.items():
            m.save(step, {"w": torch.full((16, 16), float(step))}, metrics={"loss": loss})
    return run


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    capsys.readouterr()
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


# -- help and usage ---------------------------------------------------------------------
@pytest.mark.parametrize("command", ["ls", "verify", "inspect", "export", "gc", "plot"])
def test_every_command_has_help(command: str, capsys) -> None:
    assert main([command, "--help"]) == 0
    assert f"usage: ckptstore {command}" in capsys.readouterr().out


def test_usage_errors_and_missing_paths_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["--help"]) == 0
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert main(["ls", str(tmp_path / "nothing")]) == 2
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert main(["verify", str(tmp_path)]) == 2  # an empty directory: nothing to verify
    assert "no checkpoint" in capsys.readouterr().err


# -- ls and verify --------------------------------------------------------------------------
def test_ls_lists_checkpoints_marks_and_leftovers(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path)
    (run / ".tmp-step-000000060-abcdef012345").mkdir()
    (run / "notes.txt").write_text("mine")
    code, body = run_json(capsys, "ls", str(run))
    assert code == 0
    rows = {r["step"]: r for r in body["checkpoints"]}
    assert sorted(rows) == sorted(LOSSES)
    assert rows[20]["marks"] == ["best"] and rows[50]["marks"] == ["latest"]
    assert rows[50]["metrics"] == {"loss": "nan"}  # strict JSON: non-finite as a string
    assert rows[20]["metrics"] == {"loss": 0.3}
    assert all(r["status"] == "sound" for r in rows.values())
    assert all(r["stored_bytes"] > 0 and r["raw_bytes"] > 16 * 16 * 4 for r in rows.values())
    assert body["leftovers"] == [".tmp-step-000000060-abcdef012345"]
    assert body["foreign"] == ["notes.txt"]

    assert main(["ls", str(run)]) == 0
    text = capsys.readouterr().out
    assert "step-000000030" in text and "leftover" in text and "notes.txt" in text


def test_verify_exit_status_follows_soundness(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path, codec="none")
    code, body = run_json(capsys, "verify", str(run), "--deep")
    assert (code, body["status"], len(body["checkpoints"])) == (0, "sound", 5)
    assert main(["verify", str(run / "best")]) == 0  # a pointer resolves to its checkpoint

    payload = run / "step-000000030" / "payload.safetensors"
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0x40  # the last byte of the last tensor
    payload.write_bytes(bytes(data))
    assert main(["verify", str(run)]) == 0  # quick does not read tensor bytes
    capsys.readouterr()
    assert main(["verify", str(run), "--deep"]) == 1
    out = capsys.readouterr().out
    assert "step-000000030" in out and "corrupt" in out and "checksum" in out
    assert main(["verify", str(run / "step-000000020"), "--deep"]) == 0


def test_library_verify_accepts_a_run_directory(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    report = ckptstore.verify(run)
    assert isinstance(report, ckptstore.RunReport) and report.sound
    assert [c.step for c in report.checkpoints] == sorted(LOSSES)
    single = ckptstore.verify(run / "step-000000010", deep=True)
    assert isinstance(single, ckptstore.CheckpointReport) and single.sound
    shutil.rmtree(run / "step-000000010")
    assert ckptstore.verify_run(run).status == "sound"  # gone, and no pointer names it


def test_inspect_reports_tensors_metrics_and_versions(tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "c"
    w = torch.zeros(4, 6)
    state = {"w": w, "tied": w, "b": torch.ones(3, dtype=torch.bfloat16)}
    meta = {"config": {"lr": 3e-4, "bad": float("inf")}}
    ckptstore.save(ckpt, state, step=7, metrics={"loss": 1.25}, metadata=meta)
    code, body = run_json(capsys, "inspect", str(ckpt))
    assert code == 0
    tensors = {t["key"]: t for t in body["tensors"]}
    assert set(tensors) == {"w", "tied", "b"}
    assert tensors["b"]["dtype"] == "bfloat16" and tensors["b"]["shape"] == [3]
    assert tensors["b"]["bytes"] == 3 * 2 and tensors["w"]["bytes"] == 4 * 6 * 4
    shared = [t for t in (tensors["w"], tensors["tied"]) if t["view_of"]]
    assert len(shared) == 1 and shared[0]["stored_bytes"] == 0  # stored once
    assert body["step"] == 7 and body["metrics"] == {"loss": 1.25}
    assert body["metadata"] == {"config": {"lr": 3e-4, "bad": "inf"}}
    assert body["versions"]["torch"] == str(torch.__version__)
    assert main(["inspect", str(ckpt)]) == 0
    assert "bfloat16" in capsys.readouterr().out


# -- export ----------------------------------------------------------------------------------
def test_export_loads_in_safetensors_as_ckptstore_loads(tmp_path: Path, capsys) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "model": {"w": base, "tied": base, "wt": base.t(), "rows": base[1:3]},
        "z": torch.tensor([1 + 2j, -3j], dtype=torch.complex128),
        "h": torch.arange(5, dtype=torch.float16),
        "step": 3,
    }
    ckptstore.save(tmp_path / "c", state, codec="zstd", step=3)
    out = tmp_path / "out.safetensors"
    assert main(["export", str(tmp_path / "c"), str(out)]) == 0
    assert "complex128" in capsys.readouterr().err  # the conversion is said

    exported = load_file(out)
    loaded = ckptstore.load(tmp_path / "c")
    expected = {
        "model/w": loaded["model"]["w"],
        "model/tied": loaded["model"]["tied"],
        "model/wt": loaded["model"]["wt"],
        "model/rows": loaded["model"]["rows"],
        "h": loaded["h"],
    }
    assert set(exported) == set(expected) | {"z"}
    for key, tensor in expected.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    # The values themselves, independent of ckptstore: aliases are whole tensors of their own.
    assert torch.equal(exported["model/wt"], base.t()) and torch.equal(
        exported["model/rows"], base[1:3]
    )
    # complex128 has no safetensors dtype: real pairs, listed in the metadata.
    assert torch.equal(torch.view_as_complex(exported["z"]), state["z"])
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["ckptstore.converted"]) == {"z": "complex128"}
    assert main(["export", str(tmp_path / "c"), str(out)]) == 2  # exists: needs --force


# -- gc --------------------------------------------------------------------------------------
def test_gc_applies_the_manager_rules_and_dry_run_deletes_nothing(tmp_path, capsys) -> None:
    run = make_run(tmp_path)
    (run / ".trash-step-000000005-abcdef012345").mkdir()
    before = sorted(os.listdir(run))
    argv = ["gc", str(run), "--keep-last", "2", "--keep-best", "1", "--metric", "loss"]

    code, plan = run_json(capsys, *argv, "--dry-run")
    assert code == 0 and sorted(os.listdir(run)) == before
    # Last 2: steps 40, 50; best by loss: 20 (0.3; NaN never qualifies). 10 and 30 go.
    assert [d["step"] for d in plan["delete"]] == [10, 30]
    assert [d["step"] for d in plan["keep"]] == [20, 40, 50]
    assert all("not among the last 2" in d["reasons"] for d in plan["delete"])
    assert plan["leftovers"] == [".trash-step-000000005-abcdef012345"]

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "deleted step-000000010" in out and "not among the best 1 by loss" in out
    assert sorted(n for n in os.listdir(run) if n.startswith("step-")) == [
        "step-000000020",
        "step-000000040",
        "step-000000050",
    ]
    assert not any(n.startswith((".trash-", ".tmp-")) for n in os.listdir(run))
    assert main(["verify", str(run)]) == 0  # the pointers still resolve


def test_gc_refuses_while_a_writer_holds_the_lock(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path)
    with CheckpointManager(run):
        assert main(["gc", str(run), "--keep-last", "1"]) == 3
    assert "being written" in capsys.readouterr().err
    assert len([n for n in os.listdir(run) if n.startswith("step-")]) == len(LOSSES)
    assert main(["gc", str(run), "--keep-last", "1", "--keep-best", "1"]) == 2  # no --metric


# -- plot and demo -------------------------------------------------------------------------------
def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path)
    image = tmp_path / "run.png"
    assert main(["plot", str(run), "-o", str(image)]) == 0
    data = image.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_demo_is_passed_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("ckptstore.demo")
    fake.main = lambda argv: seen.append(argv) or 5  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ckptstore.demo", fake)
    assert main(["demo", "--epochs", "1", "--help"]) == 5
    assert seen == [["--epochs", "1", "--help"]]


def test_demo_missing_exits_2(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ckptstore.demo", None)  # import fails as if absent
    assert main(["demo"]) == 2
    assert "demo" in capsys.readouterr().err


# -- the console script -----------------------------------------------------------------------
def test_console_script_verifies_a_run(tmp_path: Path) -> None:
    run = make_run(tmp_path, codec="none")
    script = Path(sys.executable).with_name("ckptstore")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ckptstore.cli"]
    done = subprocess.run(
        [*command, "verify", str(run), "--json"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)  # strict: json would accept NaN, so check the text too
    assert "NaN" not in done.stdout and body["status"] == "sound"
    assert not math.isnan(len(body["checkpoints"]))
    os.truncate(run / "step-000000040" / "payload.safetensors", 10)
    done = subprocess.run(
        [*command, "verify", str(run)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "step-000000040" in done.stdout


def test_verify_reports_a_latest_pointer_left_on_an_older_checkpoint(tmp_path: Path) -> None:
    # What a kill between a commit and the pointer move leaves behind.
    run = tmp_path / "run"
    with ckptstore.CheckpointManager(run) as manager:
        for step in (1, 2):
            manager.save(step, {"w": torch.ones(2) * step})
    os.remove(run / "latest")
    os.symlink("step-000000001", run / "latest")
    report = ckptstore.verify_run(run)
    assert report.status == "incomplete"
    (latest,) = [p for p in report.pointers if p.name == "latest"]
    assert latest.status == "stale" and "step-000000002" in str(latest.reason)
    with ckptstore.CheckpointManager(run):  # a writer opening the run moves it
        pass
    assert os.readlink(run / "latest") == "step-000000002"
    assert ckptstore.verify_run(run).status == "sound"


def test_version_names_the_codec_backend(capsys: pytest.CaptureFixture[str]) -> None:
    from ckptstore import _codec

    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"ckptstore {ckptstore.__version__} (byte-grouping kernel: {_codec.backend()})"
