"""The CUDA path of the snapshot: pinned staging, copies ordered on the caller's stream.

Skipped without a GPU (CI has none). On a machine with one, `python tools/cuda_check.py`
runs these and a short timing of the stall.
"""

from __future__ import annotations

import pytest
import torch

import ckptstore
from ckptstore import _layout, _snapshot, _tree

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_only_snapshot_never_touches_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA branch must not run (or initialise CUDA) for a CPU-only state.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("CUDA touched for a CPU state")

    monkeypatch.setattr(torch.cuda, "Event", refuse)
    _, leaves = _tree.flatten({"w": torch.ones(3)})
    snap = _snapshot.take(_layout.plan(leaves), _snapshot.StagingPool())
    assert snap.ready is None
    assert not snap.buffer.is_pinned()


@cuda
def test_gpu_snapshot_is_pinned_and_taken_before_return(tmp_path: object) -> None:
    w = torch.randn(1024, 1024, device="cuda")
    expected = w.cpu()
    checkpointer = ckptstore.Checkpointer()
    handle = checkpointer.save(f"{tmp_path}/ck", {"w": w})
    # Kernels queued on the same stream after save() returns must not reach the copy.
    for _ in range(10):
        w.mul_(3.0).add_(1.0)
    handle.wait()
    checkpointer.close()
    loaded = ckptstore.load(f"{tmp_path}/ck")
    assert torch.equal(loaded["w"], expected)


@cuda
def test_gpu_staging_buffers_are_pinned() -> None:
    _, leaves = _tree.flatten({"w": torch.ones(1000, device="cuda")})
    snap = _snapshot.take(_layout.plan(leaves), _snapshot.StagingPool())
    assert snap.buffer.is_pinned()
    assert snap.ready is not None
    snap.wait_ready()
    assert torch.equal(snap.buffer.view(torch.float32), torch.ones(1000))


@cuda
def test_map_location_cuda_keeps_tied_weights_tied(tmp_path: object) -> None:
    e = torch.randn(10, 4)
    ckptstore.save(f"{tmp_path}/ck", {"embed": e, "head": e})
    loaded = ckptstore.load(f"{tmp_path}/ck", map_location="cuda")
    assert loaded["embed"].device.type == "cuda"
    assert loaded["embed"].data_ptr() == loaded["head"].data_ptr()
    assert torch.equal(loaded["embed"].cpu(), e)
