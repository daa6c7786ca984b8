"""ckptstore and its peers behind one shape: save -> (blocking s, durable s), load -> s.

Each save writes a fresh path under `root` and returns how long the caller was blocked
and how long until the checkpoint was on disk (the peer's own completion; torch.save and
safetensors get an explicit fsync, DCP fsyncs by default, torchsnapshot does not).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import ckptstore

SaveFn = Callable[[dict[str, torch.Tensor], str], tuple[float, float]]

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save(flat: dict[str, torch.Tensor], path: str) -> tuple[float, float]:
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(flat, f)
        f.flush()
        block = time.perf_counter() - start
        os.fsync(f.fileno())
    return block, time.perf_counter() - start


def safetensors_save(flat: dict[str, torch.Tensor], path: str) -> tuple[float, float]:
    start = time.perf_counter()
    save_file(flat, path)
    block = time.perf_counter() - start
    _fsync_file(path)
    return block, time.perf_counter() - start


def dcp_save(flat: dict[str, torch.Tensor], path: str) -> tuple[float, float]:
    import torch.distributed.checkpoint as dcp

    start = time.perf_counter()
    dcp.save(flat, checkpoint_id=path)
    seconds = time.perf_counter() - start
    return seconds, seconds


def dcp_async_save(flat: dict[str, torch.Tensor], path: str) -> tuple[float, float]:
    import torch.distributed.checkpoint as dcp

    start = time.perf_counter()
    future = dcp.async_save(flat, checkpoint_id=path)
    block = time.perf_counter() - start
    future.result()
    return block, time.perf_counter() - start


def torchsnapshot_unavailable() -> str | None:
    """Why torchsnapshot cannot run here, or None when it works."""
    try:
        import torchsnapshot  # noqa: F401
    except Exception as error:  # any import failure makes the peer unavailable
        return f"import failed: {error!r}"
    return None


def torchsnapshot_async(flat: dict[str, torch.Tensor], path: str) -> tuple[float, float]:
    import torchsnapshot

    start = time.perf_counter()
    pending = torchsnapshot.Snapshot.async_take(
        path=path, app_state={"state": torchsnapshot.StateDict(**flat)}
    )
    block = time.perf_counter() - start
    pending.wait()
    return block, time.perf_counter() - start


_ZIPNN_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def zipnn_seconds(
    tensors: list[tuple[bytes, torch.dtype]], check: bool = False
) -> tuple[float, int, float]:
    """ZipNN, one thread, one call per tensor (``input_format="byte"``): every tensor
    compressed, then every output decompressed. (encode s, stored bytes, decode s);
    ``check``: also verify the round trip (outside the timing)."""
    from zipnn import ZipNN

    codecs = [
        ZipNN(input_format="byte", bytearray_dtype=_ZIPNN_DTYPE[d], threads=1) for _, d in tensors
    ]
    inputs = [bytearray(data) for data, _ in tensors]
    start = time.perf_counter()
    outs = [codec.compress(data) for codec, data in zip(codecs, inputs, strict=True)]
    enc = time.perf_counter() - start
    start = time.perf_counter()
    for codec, out in zip(codecs, outs, strict=True):
        codec.decompress(out)  # dropped at once: the next output reuses its memory, as
        # ckptstore's decode reuses ready buffers in codec_seconds
    dec = time.perf_counter() - start
    if check:
        for codec, out, (data, _) in zip(codecs, outs, tensors, strict=True):
            assert bytes(codec.decompress(out)) == data, "ZipNN round trip failed"
    return enc, sum(len(o) for o in outs), dec


class CkptstoreAsync:
    """`Checkpointer` saves; `fresh()` starts a new one (a first save, cold staging)."""

    def __init__(self, codec: str, threads: int) -> None:
        self.codec = codec
        self.threads = threads
        self.checkpointer: ckptstore.Checkpointer | None = None
        self.last: ckptstore.CommitResult | None = None

    def fresh(self) -> None:
        self.close()
        self.checkpointer = ckptstore.Checkpointer(codec=self.codec, threads=self.threads)

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None

    def __call__(self, flat: dict[str, torch.Tensor], path: str) -> tuple[float, float]:
        if self.checkpointer is None:
            self.fresh()
        assert self.checkpointer is not None
        start = time.perf_counter()
        handle = self.checkpointer.save(path, flat)
        block = time.perf_counter() - start
        self.last = handle.wait()
        return block, time.perf_counter() - start


def stored_bytes(path: str) -> int:
    return sum(os.path.getsize(name) for name in _files(path))


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]


def evict(path: str) -> None:
    """Drop the files under `path` from the page cache, so the next read comes from disk.

    fsync first: dirty pages (torch.save does not fsync) are not dropped by the advice.
    """
    for name in _files(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


# ------------------------------------------------------------------------------- loads


def torch_load(path: str, like: dict[str, torch.Tensor]) -> Any:
    return torch.load(path, weights_only=True)


def safetensors_load(path: str, like: dict[str, torch.Tensor]) -> Any:
    return load_file(path)


def dcp_load(path: str, like: dict[str, torch.Tensor]) -> Any:
    import torch.distributed.checkpoint as dcp

    out = {k: torch.empty_like(v) for k, v in like.items()}
    dcp.load(out, checkpoint_id=path)
    return out


def ckptstore_load(path: str, like: dict[str, torch.Tensor]) -> Any:
    return ckptstore.load(path)


def ckptstore_one(path: str, key: str) -> tuple[float, int, torch.Tensor]:
    """Seconds and payload bytes read to load one tensor."""
    from ckptstore._read import CheckpointReader
    from ckptstore._storage import LocalStorage

    full = os.path.abspath(path)
    start = time.perf_counter()
    with CheckpointReader(LocalStorage(os.path.dirname(full)), os.path.basename(full)) as r:
        tensor = r.load([key])[key]
        read = r.bytes_read
    return time.perf_counter() - start, read, tensor
