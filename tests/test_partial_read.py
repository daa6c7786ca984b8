"""Loading one key reads only the stored chunks that hold it, for both codecs."""

from __future__ import annotations

from pathlib import Path

import torch

import ckptstore
from ckptstore._read import CheckpointReader
from ckptstore._storage import LocalStorage


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # Three tensors of several chunks each (chunk_size 64 KiB below).
    return {f"t{i}": torch.randn(100_000, generator=gen) for i in range(3)}


def test_one_key_reads_only_its_chunks_compressed(tmp_path: Path) -> None:
    state = _state()
    ckptstore.save(tmp_path / "ck", state, codec="zstd", chunk_size=64 << 10)
    with CheckpointReader(LocalStorage(tmp_path), "ck") as reader:
        entry = reader.manifest.entries["t1"]
        record = reader.manifest.files[entry.file]
        start = record.header_size + entry.offset
        end = start + entry.nbytes
        # Independently of the reader: the chunks whose plain range meets the tensor's.
        expected = sum(
            c.stored_len
            for c in record.chunks
            if c.raw_offset < end and c.raw_offset + c.raw_len > start
        )
        loaded = reader.load(keys=["t1"])
        assert reader.bytes_read == expected
        assert expected < record.size / 2
    assert torch.equal(loaded["t1"], state["t1"])
    assert set(loaded) == {"t1"}


def test_one_key_reads_only_its_bytes_plain(tmp_path: Path) -> None:
    state = _state()
    ckptstore.save(tmp_path / "ck", state, chunk_size=64 << 10)
    with CheckpointReader(LocalStorage(tmp_path), "ck") as reader:
        loaded = reader.load(keys=["t2"])
        assert reader.bytes_read == state["t2"].numel() * 4
    assert torch.equal(loaded["t2"], state["t2"])
