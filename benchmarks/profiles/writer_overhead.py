"""What the writer adds to the codec: write_payload into a handle that discards the
bytes, against encoding the same chunks on a pool of the same size, against a real
commit (payload to disk, fsyncs, manifest). Interleaved, five rounds.

    python benchmarks/profiles/writer_overhead.py [b_minilm_bf16]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _states as st

import ckptstore
from ckptstore._api import prepare
from ckptstore._format import CodecConfig, write_payload
from ckptstore._snapshot import StagingPool
from ckptstore._storage import LocalStorage
from ckptstore._workers import WorkerPool


class _Discard:
    def write(self, data: object) -> None:
        pass


def main(name: str) -> None:
    flat = st.build_states(False)[name]()
    chunks = st.chunks_of(flat)
    scratch = tempfile.mkdtemp()
    codec = CodecConfig("zstd")
    take = prepare(LocalStorage(scratch), "x", flat, step=None, metrics=None, metadata=None,
                   codec=codec)  # fmt: skip
    snapshot = take(StagingPool()).snapshot
    snapshot.wait_ready()
    pool = WorkerPool(2)
    checkpointer = ckptstore.Checkpointer(codec="zstd", threads=2)
    try:
        for i in range(5):
            start = time.perf_counter()
            write_payload(_Discard(), snapshot, codec, pool)  # type: ignore[arg-type]
            to_nothing = time.perf_counter() - start
            encode, _, _ = st.codec_seconds(chunks, 2)
            handle = checkpointer.save(os.path.join(scratch, f"c{i}"), flat)
            start = time.perf_counter()
            handle.wait()
            commit = time.perf_counter() - start
            print(f"{name}: write_payload, bytes discarded {to_nothing * 1e3:.1f} ms | "
                  f"encode alone, 2 threads {encode * 1e3:.1f} ms | "
                  f"commit after save() returned {commit * 1e3:.1f} ms")  # fmt: skip
    finally:
        checkpointer.close()
        pool.close()
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "b_minilm_bf16")
