import sys
import tempfile
import time

sys.path.insert(0, "benchmarks")
import _states as st

import ckptstore

flat = st.build_states(False)["a_adamw64m"]()
d = tempfile.mkdtemp(dir="/tmp/bprobe")
with ckptstore.Checkpointer(codec="zstd", threads=2) as c:
    for i in range(3):
        t = time.perf_counter()
        h = c.save(f"{d}/s{i}", flat)
        b = time.perf_counter() - t
        r = h.wait()
        print(
            f"save {i}: blocked {b:.3f}s, commit {r.seconds:.3f}s, {r.raw_bytes}->{r.stored_bytes}",
            flush=True,
        )
