"""ckptstore against its peers, side by side in one run, reported as ratios.

    python3 tools/dev.py bench [--quick] [--only stall,ratio,...] [--repeat 3] [--threads N]

Every figure is a ratio against a peer or a bound measured in the same run, interleaved
with it (each repeat measures both back to back, in rotating order; the table shows the
median of the per-repeat ratios), because the machines this runs on are shared and their
absolute speed varies several-fold within minutes. Absolute times are context only.

Writes benchmarks/results/latest.json and latest.png (the committed results the README
shows; --quick writes under benchmarks/results/quick/, which git ignores; --out chooses)
and prints the markdown table. Sections (--only): save (stall and commit), ratio,
restore, memory, train.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _peers as peers
import _states as st
import _train

import ckptstore

SECTIONS = ("save", "ratio", "restore", "memory", "train")
HERE = os.path.dirname(os.path.abspath(__file__))


class Report:
    def __init__(self) -> None:
        self.figures: list[dict[str, Any]] = []
        self.context: dict[str, Any] = {}

    def add(
        self,
        figure: str,
        state: str,
        value: float,
        against: str,
        bound: float,
        target: str = "",
        unit: str = "s",
        ratio: float | None = None,
        note: str = "",
    ) -> None:
        if ratio is None:
            ratio = value / bound if bound else float("nan")
        ok = None
        if target:
            op, limit = target.split(" ")
            ok = {"<=": ratio <= float(limit), "<": ratio < float(limit)}.get(op)
            if ok is None:
                ok = ratio >= float(limit) if op == ">=" else ratio > float(limit)
        self.figures.append(
            dict(figure=figure, state=state, value=value, unit=unit, against=against,
                 bound=bound, ratio=ratio, target=target, ok=ok, note=note)
        )  # fmt: skip
        mark = "" if ok is None else (" ok" if ok else " MISSED")
        print(f"  {figure} [{state}] {ratio:.3f} ({value:.4g} {unit} vs {bound:.4g}){mark}")


def median_ratio(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(median value, median bound, median of per-repeat ratios)."""
    return (
        statistics.median(v for v, _ in pairs),
        statistics.median(b for _, b in pairs),
        statistics.median(v / b for v, b in pairs),
    )


# ---------------------------------------------------------------------------- sections


def repeats(args: argparse.Namespace, raw: int) -> int:
    """Repeats for a state of `raw` bytes: at least 5 below 256 MB. Their saves and loads
    take tens of milliseconds, as long as one hiccup of this shared machine (one of three
    bf16 MiniLM stalls once took 164 ms against 5 ms for the other two), and they are cheap."""
    return args.repeat if raw >= 256 << 20 or args.quick else max(args.repeat, 5)


def save_section(
    name: str, flat: dict, args: argparse.Namespace, scratch: str, report: Report, keep: dict
) -> None:
    """Stall (first and steady) and save-to-durable-commit, against memcpy and the peers."""
    raw = st.nbytes(flat)
    chunks = st.chunks_of(flat)
    ours = peers.CkptstoreAsync("zstd", args.threads)
    plain = peers.CkptstoreAsync("none", args.threads)
    contenders: dict[str, peers.SaveFn] = {
        "ckptstore": ours,
        "ckptstore-none": plain,
        "torch.save": peers.torch_save,
        "safetensors": peers.safetensors_save,
        "dcp.save": peers.dcp_save,
        "dcp.async_save": peers.dcp_async_save,
    }
    why_not = peers.torchsnapshot_unavailable()
    if why_not is None:
        contenders["torchsnapshot"] = peers.torchsnapshot_async
    else:
        report.context.setdefault("unavailable", {})["torchsnapshot"] = why_not
    buffer: list = []
    samples: dict[str, list] = {k: [] for k in ("first", "bound", "decode", "stall")}
    samples |= {k: [] for k in contenders}
    for rep in range(repeats(args, raw)):
        ours.fresh()  # a first save: new staging buffer, pages not yet faulted
        block, done = ours(flat, path := os.path.join(scratch, f"first-{rep}"))
        peers.remove(path)
        samples["first"].append((block, st.memcpy_seconds(flat, True, buffer)))
        order = list(contenders)
        order = order[rep % len(order) :] + order[: rep % len(order)]
        for peer in order:
            path = os.path.join(scratch, f"{peer}-{rep}")
            block, done = contenders[peer](flat, path)
            samples[peer].append((block, done, peers.stored_bytes(path)))
            if rep == args.repeat - 1:
                keep[peer] = path
            else:
                peers.remove(path)
        stored = samples["ckptstore"][-1][2]
        write_speed = st.fsync_write_speed(scratch, max(stored, 64 << 20))
        enc, _, dec = st.codec_seconds(chunks, args.threads)
        samples["bound"].append((stored / write_speed, enc, write_speed, raw / enc))
        samples["decode"].append(dec)  # the restore section's limit row
    # The steady stall against its bound alone: saves and warm memcpys back to back. Among
    # the peers' saves it varied 1.2-2.6x on MiniLM within one run (whatever the previous
    # peer left behind: dirty pages, a background thread), which says nothing about save().
    for rep in range(2 * repeats(args, raw)):
        path = os.path.join(scratch, f"stall-{rep}")
        block, _ = ours(flat, path)
        peers.remove(path)
        samples["stall"].append((block, st.memcpy_seconds(flat, False, buffer)))
    ours.close()
    plain.close()
    buffer.clear()

    first = median_ratio(samples["first"])
    report.add("stall first save ÷ memcpy", name, first[0], "memcpy (fresh buffer)", first[1],
               ratio=first[2])  # fmt: skip
    ours_s = samples["ckptstore"]
    for label, key in (("stall", 0), ("commit", 1)):
        for peer in contenders:
            if peer == "ckptstore" or (label == "stall" and peer == "ckptstore-none"):
                continue
            pairs = [(o[key], p[key]) for o, p in zip(ours_s, samples[peer], strict=True)]
            v, b, r = median_ratio(pairs)
            target = "< 1" if (label, peer) == ("commit", "dcp.async_save") else ""
            report.add(f"{label} ÷ {peer}", name, v, peer, b, target, ratio=r)
    v, b, r = median_ratio(samples["stall"])
    report.add("stall steady ÷ memcpy", name, v, "memcpy (warm buffer)", b, "<= 1.5", ratio=r,
               note=f"{len(samples['stall'])} saves and copies back to back")  # fmt: skip
    bounds = [max(w, e) for w, e, _, _ in samples["bound"]]
    v, b, r = median_ratio([(o[1], bd) for o, bd in zip(ours_s, bounds, strict=True)])
    report.add("commit ÷ max(stored/disk, raw/codec)", name, v, "bound", b, "<= 1.3", ratio=r)
    report.context.setdefault("save", {})[name] = {
        "raw_bytes": raw,
        "threads": args.threads,
        "samples": samples,
        "disk_write_Bps": statistics.median(s[2] for s in samples["bound"]),
        "codec_encode_Bps_on_threads": statistics.median(s[3] for s in samples["bound"]),
        "stored_bytes": {p: samples[p][-1][2] for p in contenders},
    }


def ratio_section(name: str, flat: dict, args: argparse.Namespace, report: Report) -> None:
    """Stored ÷ raw and ÷ ZipNN on the same tensors; speeds per core.

    Both codecs are measured alike and interleaved, in alternating order: every tensor
    compressed, then every output decompressed (so neither decodes data its encoder just
    left in cache), one thread each. Speeds are each codec's best of at least 5 passes:
    other work on the machine only ever slows a pass down, and on this VM a single pass of
    either moved by up to 1.6x between neighbouring repeats.
    """
    chunks = st.chunks_of(flat)
    raw = st.nbytes(flat)
    tensors = [(t.contiguous().view(torch.uint8).numpy().tobytes(), t.dtype) for t in flat.values()]
    ours_s: list[tuple[float, int, float]] = []
    theirs_s: list[tuple[float, int, float]] = []
    for rep in range(max(args.repeat, 5)):
        for which in ("ours", "zipnn") if rep % 2 == 0 else ("zipnn", "ours"):
            if which == "ours":
                ours_s.append(st.codec_seconds(chunks, 1))
            else:
                theirs_s.append(peers.zipnn_seconds(tensors, check=rep == 0))
    stored, z_stored = ours_s[0][1], theirs_s[0][1]
    report.add("stored ÷ raw", name, stored, "raw bytes", raw, unit="B")
    report.add("stored ÷ ZipNN stored", name, stored, "ZipNN", z_stored, "<= 1", unit="B")
    for label, at in (("compress", 0), ("decompress", 2)):
        ours_speed = raw / min(o[at] for o in ours_s) / 1e9
        zipnn_speed = raw / min(z[at] for z in theirs_s) / 1e9
        report.add(f"{label} speed/core ÷ ZipNN", name, ours_speed, "ZipNN GB/s", zipnn_speed,
                   ">= 1", unit="GB/s", note="best of each")  # fmt: skip
    report.context.setdefault("codec", {})[name] = {"ckptstore": ours_s, "zipnn": theirs_s}


def restore_section(
    name: str, flat: dict, args: argparse.Namespace, report: Report, keep: dict
) -> None:
    loads: dict[str, Callable[[str, dict], Any]] = {
        "ckptstore": peers.ckptstore_load,
        "ckptstore-none": peers.ckptstore_load,
        "torch.load": peers.torch_load,
        "safetensors": peers.safetensors_load,
        "dcp.load": peers.dcp_load,
    }
    paths = {"ckptstore": keep["ckptstore"], "ckptstore-none": keep["ckptstore-none"],
             "torch.load": keep["torch.save"],
             "safetensors": keep["safetensors"], "dcp.load": keep["dcp.save"]}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in loads}
    cold: dict[str, list[float]] = {k: [] for k in ("ckptstore", "ckptstore-none", "torch.load")}
    decode = report.context["save"][name]["samples"]["decode"]  # measured by save_section
    for rep in range(repeats(args, st.nbytes(flat))):
        order = list(loads)[rep % len(loads) :] + list(loads)[: rep % len(loads)]
        for peer in order:
            times[peer].append(st.timed(lambda p=peer: loads[p](paths[p], flat)))
        for peer in order:
            if peer in cold:  # from disk: what a resume on a fresh node or after a reboot sees
                peers.evict(paths[peer])
                cold[peer].append(st.timed(lambda p=peer: loads[p](paths[p], flat)))
    got = peers.ckptstore_load(paths["ckptstore"], flat)
    assert all(torch.equal(got[k], v) for k, v in flat.items()), "ckptstore restore differs"
    for peer in ("torch.load", "safetensors", "dcp.load"):
        pairs = list(zip(times["ckptstore"], times[peer], strict=True))
        v, b, r = median_ratio(pairs)
        report.add(f"restore ÷ {peer}", name, v, peer, b, "< 1" if peer == "torch.load" else "",
                   ratio=r)  # fmt: skip
    pairs = list(zip(times["ckptstore-none"], times["torch.load"], strict=True))
    v, b, r = median_ratio(pairs)
    report.add("restore (codec none) ÷ torch.load", name, v, "torch.load", b, "< 1", ratio=r)
    for ours in ("ckptstore", "ckptstore-none"):
        v, b, r = median_ratio(list(zip(cold[ours], cold["torch.load"], strict=True)))
        label = "" if ours == "ckptstore" else " (codec none)"
        report.add(f"restore from disk{label} ÷ torch.load from disk", name, v,
                   "torch.load, page cache dropped", b, "< 1", ratio=r)  # fmt: skip
    # The limit of a compressed restore from the page cache: decoding alone, on the
    # reader's threads with nothing read, hashed or allocated, against torch.load's copy.
    v, b, r = median_ratio(list(zip(decode, times["torch.load"], strict=True)))
    report.add("decode alone ÷ torch.load (the limit)", name, v, "torch.load", b, ratio=r,
               note=f"{args.threads} threads")  # fmt: skip
    v, b, r = median_ratio(list(zip(times["ckptstore"], decode, strict=True)))
    report.add("restore ÷ decode alone", name, v, "decode alone", b, ratio=r)
    size = {k: t.numel() * t.element_size() for k, t in flat.items()}
    small = [k for k in flat if size[k] * 8 <= sum(size.values())]
    key = max(small, key=size.__getitem__) if small else min(flat, key=size.__getitem__)
    seconds, read, tensor = peers.ckptstore_one(paths["ckptstore"], key)
    assert torch.equal(tensor, flat[key])
    whole = statistics.median(times["ckptstore"])
    total = peers.stored_bytes(paths["ckptstore"])
    report.add("one tensor: bytes read ÷ stored", name, read, "checkpoint stored bytes", total,
               unit="B", note=f"{key}: {size[key]} raw B")  # fmt: skip
    report.add("one tensor: time ÷ whole restore", name, seconds, "whole restore", whole)


def memory_section(flat: dict, small: dict, args: argparse.Namespace, scratch: str,
                   report: Report, state: str, small_name: str) -> None:  # fmt: skip
    """Peak extra RSS during async saves; RSS growth over many saves of a smaller state."""
    size = st.nbytes(flat)
    checkpointer = ckptstore.Checkpointer(codec="zstd", threads=args.threads)
    try:
        for label in ("first", "steady"):
            with st.RssSampler() as sampler:
                checkpointer.save(os.path.join(scratch, f"mem-{label}"), flat).wait()
            peers.remove(os.path.join(scratch, f"mem-{label}"))
            report.add(f"peak extra RSS ({label} save) ÷ state", state, sampler.extra,
                       "state bytes", size, "<= 1.1" if label == "first" else "<= 0.1",
                       unit="B")  # fmt: skip
    finally:
        checkpointer.close()
    saves = 10 if args.quick else 100
    run = os.path.join(scratch, "mem-run")
    series = []
    with ckptstore.CheckpointManager(run, codec="zstd", keep_last=2, threads=args.threads) as m:
        for step in range(saves):
            m.save(step, small).wait()
            series.append(st.rss())
    peers.remove(run)
    warm = min(5, saves // 2)
    # Medians of ten samples at each end, not two single samples: glibc returns freed
    # pages to the system now and then, which moved one sample by up to 20 MB either way
    # while the series as a whole stayed flat (a leak still shows: it moves every sample).
    span = max(1, min(10, saves // 4))
    growth = statistics.median(series[-span:]) - statistics.median(series[warm : warm + span])
    # A leak grows in every save; the allocator settling does not. Per save, second half:
    late = (series[-1] - series[saves // 2 - 1]) / (saves - saves // 2)
    report.add(f"RSS growth saves {warm}..{warm + span}->{saves - span}..{saves} ÷ state",
               small_name, growth,
               "state bytes", st.nbytes(small), "<= 0.05", unit="B",
               note=f"{saves} saves of the smaller state {small_name}; "
                    f"second half {late / 1e3:+.1f} KB per save")  # fmt: skip
    report.context["rss_series"] = series


def train_section(args: argparse.Namespace, scratch: str, report: Report) -> None:
    """Steps/s with checkpoints ÷ without. The target row gives training the cores the
    writer leaves (torch threads = cores - writer threads); the row with torch on every
    core shows what happens when training and writer share cores (see _train.py)."""
    cores = os.cpu_count() or 1
    left = max(1, cores - args.train_threads)
    configs = [(left, "zstd", False, ">= 0.98"), (left, "none", False, ">= 0.98"),
               (left, "zstd", True, "")]  # fmt: skip
    if cores != left:
        configs += [(cores, "zstd", False, ""), (cores, "none", False, "")]
    for torch_threads, codec, lazy, target in configs:
        result = _train.overhead(
            args.quick, args.train_threads, codec, args.repeat, scratch, torch_threads, lazy
        )
        label = f"{codec}{', lazy' if lazy else ''}, {torch_threads} torch threads"
        report.add(f"training steps/s with checkpoints ÷ without ({label})", "train",
                   result["with"], "without", result["without"], target, unit="steps/s",
                   ratio=result["ratio"], note=result["note"])  # fmt: skip
        report.context.setdefault("train", {})[label] = result
    # The stall of lazy saves, reported apart: after_step() on a save step only arms the
    # copy (it happens in the next forward/backward, and shows in the steps/s row above).
    results = report.context["train"]
    eager, lazy_ = (
        results.get(f"zstd, {left} torch threads"),
        results.get(f"zstd, lazy, {left} torch threads"),
    )
    if eager and lazy_:
        note = "median over the saves; zstd, torch on the cores the writer leaves"
        report.add("stall per save, lazy ÷ eager (training loop)", "train",
                   lazy_["save_blocked_s"], "eager save()", eager["save_blocked_s"],
                   note=note)  # fmt: skip


# ------------------------------------------------------------------------------ output


def table(report: Report) -> str:
    lines = [
        "| figure | state | ratio | target | ckptstore | against | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in report.figures:
        mark = "" if f["ok"] is None else (" ✓" if f["ok"] else " ✗")
        unit = f["unit"]
        lines.append(
            f"| {f['figure']} | {f['state']} | **{f['ratio']:.3f}**{mark} | {f['target']} "
            f"| {_fmt(f['value'], unit)} | {f['against']}: {_fmt(f['bound'], unit)} "
            f"| {f['note']} |"
        )
    return "\n".join(lines)


def _fmt(value: float, unit: str) -> str:
    if unit == "B":
        return f"{value / 1e6:.1f} MB"
    return f"{value:.3g} {unit}"


def chart(report: Report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = [f for f in report.figures if f["target"]]
    labels = [f"{f['figure']} [{f['state']}]" for f in figs]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(figs) + 1.5))
    colors = ["tab:green" if f["ok"] else "tab:red" for f in figs]
    ax.barh(range(len(figs)), [f["ratio"] for f in figs], color=colors)
    for i, f in enumerate(figs):
        limit = float(f["target"].split(" ")[1])
        ax.plot([limit, limit], [i - 0.4, i + 0.4], color="black", lw=2)
    ax.set_yticks(range(len(figs)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ratio (black tick: target; green: met)")
    ax.set_title(f"ckptstore vs bounds and peers ({report.context['when']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small states (CI smoke test)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma separated")
    parser.add_argument("--states", default="", help="state names, comma separated (all)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="writer threads")
    parser.add_argument("--train-threads", type=int, default=1, help="writer threads in train")
    parser.add_argument(
        "--out",
        default=None,
        help="where latest.json and latest.png go (default: benchmarks/results, the "
        "committed results the README shows; with --quick, benchmarks/results/quick, "
        "which git ignores)",
    )
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(HERE, "results", *(["quick"] if args.quick else []))
    only = set(args.only.split(","))
    report = Report()
    report.context.update(
        when=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        cpus=os.cpu_count(),
        load_before=os.getloadavg(),
        torch=torch.__version__,
        ckptstore=ckptstore.__version__,
        args=vars(args),
    )
    states = st.build_states(args.quick)
    if args.states:
        states = {k: v for k, v in states.items() if k in args.states.split(",")}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ckptstore-bench-", dir=args.dir) as scratch:
        for name, build in states.items():
            flat = build()
            print(f"{name}: {len(flat)} tensors, {st.nbytes(flat) / 1e6:.1f} MB", flush=True)
            keep: dict[str, str] = {}
            if "save" in only or "restore" in only:
                save_section(name, flat, args, scratch, report, keep)
            if "restore" in only:
                restore_section(name, flat, args, report, keep)
            for path in keep.values():
                peers.remove(path)
            if "ratio" in only:
                ratio_section(name, flat, args, report)
            if "memory" in only and name == "a_adamw64m":
                small = st.minilm(torch.float32, 12 if args.quick else None)
                memory_section(flat, small, args, scratch, report, name, "b_minilm_fp32")
            del flat
        if "train" in only:
            train_section(args, scratch, report)
    report.context["load_after"] = os.getloadavg()
    report.context["seconds"] = time.perf_counter() - started
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump({"figures": report.figures, "context": report.context}, f, indent=1)
    chart(report, os.path.join(args.out, "latest.png"))
    print()
    print(table(report))
    load = report.context["load_before"], report.context["load_after"]
    print(f"\nload average before {load[0]}, after {load[1]}; {os.cpu_count()} cpus; "
          f"{report.context['seconds']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
