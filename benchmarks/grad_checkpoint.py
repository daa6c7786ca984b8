"""Print the measured memory/compute trade of gradient checkpointing as a markdown table.

    .venv/bin/python benchmarks/grad_checkpoint.py                 # L = 4..48, defaults below
    .venv/bin/python benchmarks/grad_checkpoint.py --layers 4 8 --repeats 1

For each depth L and policy (none / every / segments) it reports the bytes autograd saves
for backward during forward, the ratio to "none", the transient of recomputing the largest
checkpointed block during backward (held on top of the former), matmul+attention FLOPs of forward +
backward, the extra compute relative to "none", and the median wall time of one training
step (forward + backward). The bytes and FLOPs are deterministic counts; the time is
context and depends on the machine and its load.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Sequence

import torch

from ckptstore.models import CheckpointCost, activation_memory_table


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 24, 32, 48])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--window", type=int, default=64, help="sequence length")
    parser.add_argument("--features", type=int, default=2, help="input features per step")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per cell")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return parser.parse_args(argv)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f} MiB"


def format_table(rows: Sequence[CheckpointCost]) -> str:
    """Render rows as a markdown table."""
    lines = [
        "| L | policy | saved in forward | vs none | + recompute in backward "
        "| FLOPs fwd+bwd | extra compute | time/step |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.n_layers} | {r.policy} | {_mib(r.saved_bytes)} | {r.saved_ratio:.3f} "
            f"| {_mib(r.recompute_bytes)} | {r.flops / 1e9:.2f} G | {r.extra_compute:+.1%} "
            f"| {r.seconds * 1e3:.0f} ms |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Measure and print the table, preceded by the configuration that produced it."""
    args = _parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; "
        f"batch={args.batch} window={args.window} features={args.features} "
        f"d_model={args.d_model} heads={args.heads} d_ff={args.d_ff} dropout={args.dropout}, "
        "float32, train mode\n"
    )
    rows = activation_memory_table(
        layers=args.layers,
        d_in=args.features,
        d_model=args.d_model,
        n_heads=args.heads,
        d_ff=args.d_ff,
        dropout=args.dropout,
        batch=args.batch,
        window=args.window,
        repeats=args.repeats,
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
