"""TrainingCheckpointer in one process: resume, schedules, loader position, RNGs, lazy
snapshots, signals, and DataLoader workers forked while a save is in flight."""

from __future__ import annotations

import copy
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ckptstore import (
    CheckpointManager,
    Position,
    ResumableLoader,
    SaveRefusedError,
    TrainingCheckpointer,
    _writer,
)
from ckptstore._rng import capture_rng, restore_rng


class Noisy(torch.utils.data.Dataset):
    """Fixed data; each fetch draws from torch's, NumPy's and Python's generators."""

    def __init__(self, size: int = 24) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(size, 4, generator=g)
        self.y = torch.randn(size, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = float(np.random.uniform(0.5, 1.5)) * (1 if random.random() < 0.5 else -1)
        return self.x[i] * scale + torch.rand(4), self.y[i]


class Plain(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> int:
        return i


def build(**loader_options: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 8], gamma=0.3)
    loader = ResumableLoader(Noisy(), batch_size=4, seed=1, **loader_options)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loader": loader}


def train(
    parts: dict[str, Any], ckpt: TrainingCheckpointer, epochs: int, stop_at: int | None = None
) -> list[float]:
    """Train until `epochs` or until step `stop_at`; every step's loss."""
    model, optimizer, loader = parts["model"], parts["optimizer"], parts["loader"]
    out = []
    while loader.epoch < epochs:
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            parts["scheduler"].step()
            out.append(loss.item())
            ckpt.after_step()
            if ckpt.step == stop_at:
                return out
        ckpt.end_epoch(metrics={"val": model[0].weight.sum().item()})
    return out


def checkpointer(directory: Path, parts: dict[str, Any], **options: Any) -> TrainingCheckpointer:
    return TrainingCheckpointer(directory, **parts, handle_signals=False, **options)


# -- resume ---------------------------------------------------------------------------------


def test_resume_mid_epoch_repeats_the_uninterrupted_losses(tmp_path: Path) -> None:
    parts = build()
    with checkpointer(tmp_path / "a", parts, every_steps=4) as ckpt:
        assert ckpt.resume() == Position(0, 0, 0)
        expected = train(parts, ckpt, epochs=2)
        final = copy.deepcopy(parts["model"].state_dict())

    first = build()
    with checkpointer(tmp_path / "b", first, every_steps=4) as ckpt:
        ckpt.resume()
        before = train(first, ckpt, epochs=2, stop_at=10)  # checkpoint at 8, then 2 more
    torch.manual_seed(123)  # whatever happened since is overwritten by resume()
    random.seed(5)
    second = build()
    with checkpointer(tmp_path / "b", second, every_steps=4) as ckpt:
        assert ckpt.resume() == Position(8, 1, 2)
        after = train(second, ckpt, epochs=2)

    assert before == expected[:10]
    assert after == expected[8:]
    for key, value in final.items():
        assert torch.equal(second["model"].state_dict()[key], value), key


def test_resume_logs_the_step_it_resumed_from(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parts = build()
    with checkpointer(tmp_path, parts, every_steps=2) as ckpt:
        train(parts, ckpt, epochs=1, stop_at=3)
    with (
        caplog.at_level(logging.INFO, logger="ckptstore.train"),
        checkpointer(tmp_path, build()) as ckpt,
    ):
        ckpt.resume()
    assert f"resumed from step 2 (epoch 0, batch 2) in {tmp_path}" in caplog.text


def test_saving_without_resume_into_a_used_directory_is_refused(tmp_path: Path) -> None:
    parts = build()
    with checkpointer(tmp_path, parts, every_steps=2) as ckpt:
        train(parts, ckpt, epochs=1, stop_at=2)
    parts = build()
    with checkpointer(tmp_path, parts, every_steps=2) as ckpt, pytest.raises(SaveRefusedError):
        train(parts, ckpt, epochs=1, stop_at=2)


def test_strict_resume_refuses_a_missing_object_and_non_strict_leaves_it(tmp_path: Path) -> None:
    parts = build()
    del parts["scheduler"]
    with checkpointer(tmp_path, parts) as ckpt:
        ckpt.save()
    with checkpointer(tmp_path, build()) as ckpt, pytest.raises(KeyError, match="scheduler"):
        ckpt.resume()
    parts = build()
    lr = parts["optimizer"].param_groups[0]["lr"]
    with checkpointer(tmp_path, parts, strict=False) as ckpt:
        assert ckpt.resume().step == 0
    assert parts["scheduler"].last_epoch == 0
    assert parts["optimizer"].param_groups[0]["lr"] == lr


# -- schedules ----------------------------------------------------------------------------


def test_periodic_save_on_an_epochs_last_step_is_left_to_end_epoch(tmp_path: Path) -> None:
    parts = build()  # 6 batches per epoch, a save every 3 steps
    with checkpointer(tmp_path, parts, every_steps=3, metric="val") as ckpt:
        train(parts, ckpt, epochs=2)
        ckpt.wait()
        assert ckpt.manager.steps() == [3, 6, 9, 12]
        epoch_end = ckpt.manager.load(6)
    assert epoch_end["progress"] == {"step": 6, "epoch": 1, "batch": 0}
    with CheckpointManager(tmp_path, read_only=True, metric="val") as manager:
        assert {info.step: info.metrics for info in manager.checkpoints()}[6].keys() == {"val"}


def scheduler_lrs(scheduler: Any, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5, 7], gamma=0.5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=20),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda n: 0.9**n + (n % 3)),
    ],
    ids=["MultiStepLR", "OneCycleLR", "LambdaLR-rebuilt-with-its-function"],
)
def test_scheduler_round_trips_exactly(
    tmp_path: Path, make: Callable[[torch.optim.Optimizer], Any]
) -> None:
    def parts() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        model = nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, make(optimizer)

    model, optimizer, scheduler = parts()
    scheduler_lrs(scheduler, optimizer, 4)
    with TrainingCheckpointer(
        tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, handle_signals=False
    ) as ckpt:
        ckpt.save()
    expected = scheduler_lrs(scheduler, optimizer, 10)

    model, optimizer, scheduler = parts()
    with TrainingCheckpointer(
        tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, handle_signals=False
    ) as ckpt:
        ckpt.resume()
    assert scheduler_lrs(scheduler, optimizer, 10) == expected
    assert len(set(expected)) > 1


def test_grad_scaler_round_trips(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler.update(new_scale=77.0)
    with TrainingCheckpointer(tmp_path, model=model, scaler=scaler, handle_signals=False) as c:
        c.save()
    restored = torch.amp.GradScaler("cpu")
    with TrainingCheckpointer(tmp_path, model=model, scaler=restored, handle_signals=False) as c:
        c.resume()
    assert restored.state_dict() == scaler.state_dict()
    assert restored.get_scale() == 77.0


# -- exactness pieces ----------------------------------------------------------------------


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_capture_restores_python_numpy_and_torch() -> None:
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()
    state = capture_rng()
    expected = draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    restore_rng(state)
    assert draws() == expected


def test_loader_iterator_does_not_draw_from_the_global_generator() -> None:
    loader = ResumableLoader(Plain(), batch_size=3, seed=4)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert [b.tolist() for b in loader] != [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert torch.equal(torch.get_rng_state(), before)


def test_loader_position_survives_a_resume_and_keeps_counting() -> None:
    def batches(loader: ResumableLoader, n: int) -> list[list[int]]:
        out = []
        while len(out) < n:
            for batch in loader:
                out.append(batch.tolist())
                if len(out) == n:
                    break
        return out

    whole = batches(ResumableLoader(Plain(), batch_size=2, seed=9), 15)
    first = ResumableLoader(Plain(), batch_size=2, seed=9)
    assert batches(first, 7) == whole[:7]  # epoch 1, 2 batches in
    second = ResumableLoader(Plain(), batch_size=2, seed=9)
    second.load_state_dict(first.state_dict())
    assert batches(second, 1) == whole[7:8]
    assert (second.epoch, second.batches) == (1, 3)  # 2 before the resume, 1 after
    third = ResumableLoader(Plain(), batch_size=2, seed=9)
    third.load_state_dict(second.state_dict())
    assert batches(third, 7) == whole[8:]
    with pytest.raises(ValueError, match="seed"):
        ResumableLoader(Plain(), batch_size=2, seed=1).load_state_dict(first.state_dict())


@pytest.mark.timeout(60)
def test_loader_with_workers_counts_only_batches_handed_out_and_repeats_augmentations() -> None:
    def take(loader: ResumableLoader, n: int | None) -> list[torch.Tensor]:
        out = []
        for x, _ in loader:
            out.append(x)
            if len(out) == n:
                break  # the workers have prefetched more than this
        return out

    options = {"num_workers": 2, "prefetch_factor": 2, "multiprocessing_context": "fork"}
    whole = take(ResumableLoader(Noisy(), batch_size=2, seed=5, **options), None)
    first = ResumableLoader(Noisy(), batch_size=2, seed=5, **options)
    head = take(first, 3)
    assert first.state_dict()["batches"] == 3
    rest_loader = ResumableLoader(Noisy(), batch_size=2, seed=5, num_workers=1)
    rest_loader.load_state_dict(first.state_dict())
    rest = take(rest_loader, None)  # another number of workers, too
    assert len(head) + len(rest) == len(whole) == 12
    for ours, theirs in zip(head + rest, whole, strict=True):
        assert torch.equal(ours, theirs)


# -- lazy snapshots ----------------------------------------------------------------------------


def test_lazy_checkpoint_equals_the_state_at_the_call(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)

    def step() -> None:
        model(torch.randn(16, 4)).pow(2).mean().backward()  # moves BatchNorm's statistics
        optimizer.step()
        optimizer.zero_grad()

    writing = threading.Event()  # holds the first save in the writer, before its rename
    manager = CheckpointManager(tmp_path, _before_rename=lambda _: writing.wait(30))
    with (
        manager,
        TrainingCheckpointer(
            manager, model=model, optimizer=optimizer, lazy=True, handle_signals=False
        ) as ckpt,
    ):
        step()
        ckpt.after_step()
        ckpt.save(lazy=False)  # step 1, stuck in the writer: the next snapshot must wait
        step()
        ckpt.after_step()
        expected = copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict()})
        assert ckpt.save() is None  # step 2: returns at once, snapshot still to be taken
        model(torch.randn(16, 4)).pow(2).mean().backward()  # the next step's forward/backward
        assert not torch.equal(model[1].running_mean, expected["model"]["1.running_mean"])
        writing.set()  # the writer finishes step 1; step 2's snapshot is taken now...
        optimizer.step()  # ...and this waits for it before changing the weights
        ckpt.wait()
        saved = manager.load(2)

    assert saved["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(saved["model"][key], value), key
    for index, per_param in expected["opt"]["state"].items():
        for name, value in per_param.items():
            assert torch.equal(saved["optimizer"]["state"][index][name], value), (index, name)


# -- signals and fork -----------------------------------------------------------------------


def test_sigint_saves_at_the_next_step_boundary_and_exits(tmp_path: Path) -> None:
    previous = signal.getsignal(signal.SIGINT)
    parts = build()
    ckpt = TrainingCheckpointer(tmp_path, **parts, every_steps=100, grace_period=10)
    ckpt.resume()
    assert signal.getsignal(signal.SIGINT) != previous
    os.kill(os.getpid(), signal.SIGINT)  # handled between bytecodes: recorded only
    assert ckpt.stop_requested
    with pytest.raises(SystemExit) as stopped:
        train(parts, ckpt, epochs=2)
    assert stopped.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is previous
    with CheckpointManager(tmp_path, read_only=True) as manager:
        assert manager.steps() == [1]
        assert manager.load(1)["progress"] == {"step": 1, "epoch": 0, "batch": 1}


def test_close_restores_the_previous_signal_handlers(tmp_path: Path) -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        with TrainingCheckpointer(tmp_path, model=nn.Linear(1, 1)):
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.timeout(60)
def test_workers_forked_while_a_save_is_in_flight_do_not_hang(tmp_path: Path) -> None:
    writing = threading.Event()
    manager = CheckpointManager(
        tmp_path, exit_timeout=20, _before_rename=lambda _: writing.wait(30)
    )
    parts = build(num_workers=2, multiprocessing_context="fork")
    with manager, TrainingCheckpointer(manager, **parts, grace_period=10) as ckpt:
        ckpt.resume()
        handle = ckpt.save()  # the writer thread is inside the commit
        assert handle is not None and not handle.done()
        batches = list(parts["loader"])  # forks two workers now
        assert len(batches) == 6
        pid = os.fork()  # a plain child: its exit runs the writer's atexit handler
        if pid == 0:
            started = time.monotonic()
            try:
                _writer._finish_pending_saves()  # what a normal interpreter exit runs
            finally:
                os._exit(0 if time.monotonic() - started < 5 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0  # it did not wait for the save
        writing.set()
        handle.wait(30)
