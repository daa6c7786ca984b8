"""A DataLoader that knows where it is in the data, and can be put back there.

Resuming mid-epoch exactly needs three things a plain DataLoader does not give:

- The epoch's order must be a function of (seed, epoch) alone. The sampler here draws
  its permutation from its own generator, seeded per epoch, never from the global one.
- Creating an iterator must not draw from the global generator. A DataLoader draws its
  workers' base seed from `generator=`, or from torch's global generator when there is
  none; here it always has one, seeded per epoch, so a resumed run's RNG stream is not
  shifted by the new iterator.
- The count of batches consumed must be the batches *handed to the caller*, not those
  the sampler gave out: workers prefetch ahead. The count is kept here, in the
  iterator the caller loops over, and survives resumes (restored, then grows).

Workers: each DataLoader worker seeds `random`, NumPy and torch once, from a base seed
and its worker id, and hands batches out round-robin; after a resume the batches fall
on other workers, so randomness inside `dataset[i]` would differ. With
`seed_per_sample=True` (the default) each sample is fetched right after seeding those
generators from (seed, epoch, index), in the worker: augmentations then repeat exactly
whatever the number of workers and wherever the run resumed.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several ints (splitmix64 over each part in turn)."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (part & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


class _EpochSampler(Sampler[Any]):
    """The epoch's order from (seed, epoch), starting `start` samples in."""

    def __init__(self, size: int, shuffle: bool, seed: int, tagged: bool) -> None:
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.tagged = tagged
        self.epoch = 0
        self.start = 0

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator()
        generator.manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        for index in self.order()[self.start :]:
            yield (epoch, index) if self.tagged else index

    def __len__(self) -> int:
        return max(0, self.size - self.start)


class _SeededSamples(Dataset[Any]):
    """`dataset[index]`, fetched in a worker right after seeding from (seed, epoch, index)."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if get_worker_info() is not None:  # the main process's generators are checkpointed
            seed = mix_seed(self.seed, epoch, index)
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            torch.manual_seed(seed)
        return self.dataset[index]


class _WorkerInit:
    """Workers leave SIGINT and SIGTERM to the main process, which stops them."""

    def __init__(self, user_fn: Callable[[int], None] | None) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        # Ctrl-C reaches the whole process group: only the main process should act on it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # A forked worker inherits the trainer's Python SIGTERM handler; not its business.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self.user_fn is not None:
            self.user_fn(worker_id)


class ResumableLoader:
    """A DataLoader over `dataset` whose position (epoch, batches consumed) is saved and restored.

    Loop over it once per epoch; the epoch advances when a loop runs to the end.
    Keyword arguments other than those below go to `torch.utils.data.DataLoader`
    (`num_workers`, `collate_fn`, `pin_memory`, `multiprocessing_context`, ...);
    `sampler`, `batch_sampler`, `shuffle` and `generator` are this class's to set.
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        seed_per_sample: bool = True,
        **loader_kwargs: Any,
    ) -> None:
        taken = {"sampler", "batch_sampler", "shuffle", "generator"} & set(loader_kwargs)
        if taken:
            raise TypeError(f"ResumableLoader sets {sorted(taken)} itself; leave them out")
        if type(batch_size) is not int or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, not {batch_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.batches = 0  # handed out in the current epoch
        tagged = seed_per_sample and loader_kwargs.get("num_workers", 0) > 0
        self._sampler = _EpochSampler(len(dataset), shuffle, seed, tagged)
        self._generator = torch.Generator()
        if loader_kwargs.get("num_workers", 0) > 0:
            loader_kwargs["worker_init_fn"] = _WorkerInit(loader_kwargs.get("worker_init_fn"))
        self.loader: DataLoader[Any] = DataLoader(
            _SeededSamples(dataset, seed) if tagged else dataset,  # type: ignore[arg-type]
            batch_size=batch_size,
            sampler=self._sampler,
            drop_last=drop_last,
            generator=self._generator,
            **loader_kwargs,
        )

    def __len__(self) -> int:
        """Batches in a whole epoch."""
        size = self._sampler.size
        return size // self.batch_size if self.drop_last else -(-size // self.batch_size)

    @property
    def epoch_done(self) -> bool:
        """Every batch of the current epoch has been handed out (the loop is about to end)."""
        return self.batches >= len(self)

    def __iter__(self) -> Iterator[Any]:
        self._sampler.epoch = self.epoch
        self._sampler.start = self.batches * self.batch_size
        self._generator.manual_seed(mix_seed(self.seed, self.epoch, 1))
        for batch in self.loader:
            self.batches += 1
            yield batch
        self.epoch += 1
        self.batches = 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "size": self._sampler.size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("seed", "batch_size", "size"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"the checkpoint's loader has {key}={state[key]}, this one {mine[key]}: "
                    "the order of the remaining batches would differ; build the loader "
                    "as the checkpointed run did"
                )
        self.epoch = int(state["epoch"])
        self.batches = int(state["batches"])

    def __repr__(self) -> str:
        return f"<ResumableLoader epoch {self.epoch}, batch {self.batches} of {len(self)}>"
