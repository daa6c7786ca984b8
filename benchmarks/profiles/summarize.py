"""Summarize py-spy raw (collapsed) stacks: samples per thread kind and leaf function.

py-spy record [--gil] --threads --format raw -o stacks.txt -- python script.py
python benchmarks/profiles/summarize.py stacks.txt
"""

from __future__ import annotations

import collections
import re
import sys


def main(path: str) -> None:
    per: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        thread = frames[0]
        kind = (
            "writer" if "ckptstore-writer" in stack or "_run (ckptstore/_writer.py" in stack
            else "worker" if "_work (ckptstore/_workers.py" in stack
            else "main"
        )  # fmt: skip
        leaf = re.sub(r" \(/[^)]*/", " (", frames[-1]) if len(frames) > 1 else thread
        per[kind][leaf] += int(count)
    for kind, counter in per.items():
        total = sum(counter.values())
        print(f"\n## {kind} threads: {total} samples")
        for leaf, n in counter.most_common(14):
            print(f"{100 * n / total:5.1f}%  {leaf}")


if __name__ == "__main__":
    main(sys.argv[1])
