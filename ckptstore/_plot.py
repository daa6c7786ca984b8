"""A picture of a run: metrics over steps with the best checkpoint marked, stored sizes.

matplotlib is an optional dependency (`pip install ckptstore[plot]`); it is imported
here only, with the Agg back-end, so no display is ever needed. Non-finite metric
values are left out of the lines (a gap), never drawn at an axis limit.
"""

from __future__ import annotations

import itertools
import math
import os

from ._pointers import DanglingPointerError, read_pointer
from ._retention import Candidate, Mode, best_step
from ._rundir import scan
from ._storage import LocalStorage
from .errors import CheckpointNotFoundError


def _best(
    storage: LocalStorage, steps: dict[str, int], metric: str | None, mode: Mode
) -> int | None:
    found = scan(storage)
    if metric is not None:
        sound = [Candidate(c.step, c.metrics) for c in found.checkpoints.values() if c.sound]
        return best_step(sound, metric, mode)
    try:
        target = read_pointer(storage, "best")
    except (DanglingPointerError, OSError):
        return None
    return steps.get(target) if target else None


def plot_run(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    metric: str | None = None,
    mode: Mode = "min",
) -> int:
    """Draw the run at `directory` into the image `out`; returns the number of checkpoints.

    The best checkpoint is the one `metric` ranks first when given, else the one the
    `best` pointer names.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"no run directory at {path}")
    storage = LocalStorage(path)
    infos = [c for _, c in sorted(scan(storage).checkpoints.items())]
    steps = [c.step for c in infos]
    best = _best(storage, {c.name: c.step for c in infos}, metric, mode)

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    names = sorted({m for c in infos for m in c.metrics})
    for name in names:
        values = [c.metrics.get(name, math.nan) for c in infos]
        values = [v if math.isfinite(v) else math.nan for v in values]
        (line,) = top.plot(steps, values, marker="o", markersize=3, label=name)
        at_best = (
            dict(zip(steps, values, strict=True)).get(best, math.nan)
            if best is not None
            else math.nan
        )
        if math.isfinite(at_best):
            top.plot([best], [at_best], marker="*", markersize=14, color=line.get_color())
    if best is not None:
        top.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best (step {best})")
    top.set_ylabel("metric")
    top.set_title(f"{path}: {len(infos)} checkpoints")
    if names or best is not None:
        top.legend(loc="best", fontsize="small")

    mib = 1 << 20
    bottom.bar(
        steps,
        [c.raw_bytes / mib for c in infos],
        width=_bar_width(steps),
        color="none",
        edgecolor="grey",
        label="raw",
    )
    bottom.bar(
        steps,
        [c.stored_bytes / mib for c in infos],
        width=_bar_width(steps),
        color=["tab:red" if not c.sound else "tab:blue" for c in infos],
        label="stored",
    )
    bottom.set_ylabel("MiB per checkpoint")
    bottom.set_xlabel("step")
    bottom.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(os.fspath(out), format="png", dpi=100)
    plt.close(figure)
    return len(infos)


def _bar_width(steps: list[int]) -> float:
    gaps = [b - a for a, b in itertools.pairwise(steps) if b > a]
    return 0.8 * min(gaps) if gaps else 0.8
