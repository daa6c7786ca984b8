"""The kill -9 campaign (tools/kill_campaign.py), short in CI and long behind --runslow.

The CI run trains shorter runs (60 steps, a save every 3) so 25 kills fit in about a
minute on two cores; the slow one uses the tool's defaults (200 steps, a save every 5).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "kill_campaign.py"


def campaign(tmp_path: Path, *args: str, timeout: float) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(TOOL), "--dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    tally: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return tally


def check(tally: dict[str, object], kills: int) -> None:
    assert tally["kills"] == kills
    assert tally["failures"] == []
    assert isinstance(tally["kills_in_write"], int) and tally["kills_in_write"] * 3 >= kills
    assert tally["runs_completed"] == tally["final_states_equal"] >= 1


def test_25_kills_leave_every_checkpoint_sound_and_training_exact(tmp_path: Path) -> None:
    tally = campaign(
        tmp_path, "--kills", "25", "--seed", "1", "--steps", "60", "--every", "3", timeout=600
    )
    check(tally, 25)


@pytest.mark.slow
def test_200_kills_on_full_length_runs(tmp_path: Path) -> None:
    check(campaign(tmp_path, "--kills", "200", "--seed", "2", timeout=7200), 200)
