"""The demo on the real market data: end to end, crash and resume, and no fake data.

The runs here use a tiny model and 512-day batches (8 steps an epoch), so each takes
seconds; most of a subprocess's time is importing torch and `arch`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("arch", reason="the demo's market data ships with `arch` (the demo extra)")

from ckptstore import CheckpointManager, demo
from ckptstore._demo_data import (
    SPLIT_DATE,
    DemoDataError,
    Prices,
    build_task,
    load_prices,
)

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--batch-size", "512", "--d-model", "8", "--heads", "2", "--layers", "1",
    "--d-ff", "16", "--window", "16", "--save-every", "3", "--no-progress",
]  # fmt: skip
STEPS_PER_EPOCH = 8  # ceil(3992 training days / 512)


def run_demo(run_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """The demo in a fresh interpreter, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "ckptstore.demo", "--run-dir", str(run_dir), *TINY, *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=run_dir.parent,
        timeout=120,
    )


def final_state(run_dir: Path) -> dict[str, Any]:
    manager = CheckpointManager(run_dir / demo.CHECKPOINTS, read_only=True)
    return manager.load("latest")


@pytest.fixture(scope="module")
def prices() -> Prices:
    return load_prices()


# -- the task ---------------------------------------------------------------------------------
def test_task_splits_by_date_and_inputs_end_the_day_before_the_target(prices: Prices) -> None:
    task = build_task(prices, window=16)
    split = np.datetime64(SPLIT_DATE)

    assert (task.dates[task.train_days.numpy()] < split).all()
    assert (task.dates[task.val_days.numpy()] >= split).all()
    assert len(task.train_days) + len(task.val_days) + 16 == len(task.dates)
    days = task.val_days[:5]
    assert torch.equal(task.inputs(days)[:, -1], task.features[days - 1])
    assert torch.equal(task.baseline(days), task.target[days - 1])


def test_task_is_standardised_with_training_days_only(prices: Prices) -> None:
    task = build_task(prices, window=16)
    train_rows = task.features[: int(task.val_days[0])].double()
    assert torch.allclose(train_rows.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(train_rows.std(0, correction=0), torch.ones(4, dtype=torch.float64))

    # Doubling every price range after the split changes nothing before it.
    later = task.dates >= np.datetime64(SPLIT_DATE)
    later = np.concatenate([[False], later])  # prices have the extra first day
    wider = dataclasses.replace(
        prices, sp500_high=np.where(later, prices.sp500_high * 1.5, prices.sp500_high)
    )
    changed = build_task(wider, window=16)
    first_val = int(task.val_days[0])
    assert torch.equal(changed.features[:first_val], task.features[:first_val])
    assert torch.equal(changed.target[:first_val], task.target[:first_val])
    assert not torch.equal(changed.target[first_val:], task.target[first_val:])


# -- refusing fake data -------------------------------------------------------------------------
def test_demo_refuses_to_run_without_the_arch_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("arch", "arch.data", "arch.data.sp500", "arch.data.nasdaq"):
        monkeypatch.setitem(sys.modules, name, None)  # what an absent package looks like

    code = demo.main(["--run-dir", str(tmp_path / "run"), *TINY])

    assert code == 2
    err = capsys.readouterr().err
    assert "`arch`" in err and "pip install" in err
    assert not (tmp_path / "run").exists()  # nothing trained on anything else


def test_demo_refuses_to_run_when_the_data_fails_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from arch.data import sp500

    def broken() -> None:
        raise FileNotFoundError("sp500.csv.gz")

    monkeypatch.setattr(sp500, "load", broken)
    with pytest.raises(DemoDataError, match=r"sp500\.csv\.gz"):
        load_prices()

    assert demo.main(["--run-dir", str(tmp_path / "run"), *TINY]) == 2
    assert "reinstall" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- the run directory --------------------------------------------------------------------------
def test_fresh_never_deletes_a_directory_the_demo_did_not_create(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(demo.RunDirError, match="not created by the demo"):
        demo.prepare_run_dir(tmp_path, demo.DemoConfig(), fresh=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    demo.prepare_run_dir(run_dir, demo.DemoConfig(), fresh=False)
    with pytest.raises(demo.RunDirError, match="seed"):
        demo.prepare_run_dir(run_dir, demo.DemoConfig(seed=1), fresh=False)
    demo.prepare_run_dir(run_dir, demo.DemoConfig(seed=1), fresh=True)  # starts over
    assert json.loads((run_dir / demo.MARKER).read_text())["seed"] == 1


# -- training -------------------------------------------------------------------------------------
def test_tiny_run_trains_end_to_end_on_the_real_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"

    assert demo.main(["--run-dir", str(run_dir), "--epochs", "1", *TINY]) == 0

    out = capsys.readouterr()
    assert "epoch 1/1  step 8" in out.err
    assert "yesterday's volatility" in out.out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS_PER_EPOCH
    assert summary["best_step"] == STEPS_PER_EPOCH
    assert summary["kept_steps"] == [3, 6, 8]  # every 3 steps, and the epoch's end
    assert 0 < summary["checkpoint_stored_bytes"] < summary["checkpoint_raw_bytes"]
    assert summary["saves"] == 3 and summary["save_blocked_max_s"] > 0
    assert 0.5 < summary["baseline_val_loss"] < 1.0  # persistence on standardised log vol
    state = final_state(run_dir)
    assert state["progress"] == {"step": 8, "epoch": 1, "batch": 0}
    assert len(state["extra"]["history"]["losses"]) == STEPS_PER_EPOCH


def test_crash_and_resume_equals_an_uninterrupted_run_bitwise(tmp_path: Path) -> None:
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    # The reference runs in this process (one interpreter start less); the same numbers
    # come out as long as no test changes torch's thread count or algorithms globally.
    assert demo.main(["--run-dir", str(whole), "--epochs", "2", *TINY]) == 0

    # Killed in epoch 2 one step after a periodic save, whose write may still be in flight.
    killed = run_demo(crashed, "--epochs", "2", "--crash-after-steps", "13")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert final_state(crashed)["progress"]["step"] in (9, 12)
    resumed = run_demo(crashed, "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stderr

    expected, got = final_state(whole), final_state(crashed)
    assert got["progress"] == expected["progress"] == {"step": 16, "epoch": 2, "batch": 0}
    for key in ("model", "optimizer", "scheduler"):
        assert_bitwise_equal(got[key], expected[key], key)
    assert_bitwise_equal(got["extra"], expected["extra"], "history")
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary == {**summary, "steps": 16, "best_step": expected_best(expected)}


def expected_best(state: dict[str, Any]) -> int:
    epochs = state["extra"]["history"]["epochs"]
    return min(epochs, key=lambda e: e["val"])["step"]


def assert_bitwise_equal(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
