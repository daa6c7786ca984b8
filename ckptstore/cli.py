"""The `ckptstore` command: ls, verify, inspect, export, gc, plot, demo.

A thin layer over the library: each subcommand calls one library function and
renders its answer as a rich table (people) or strict JSON (`--json`, scripts).
JSON never holds NaN or infinity literals: a non-finite float is written as the
string "nan", "inf" or "-inf". Nothing read from a checkpoint is ever executed.

Exit statuses (see docs/cli.md):
  0  success; for verify: everything checked is sound
  1  verify found a corrupt or incomplete checkpoint, or a dangling pointer;
     other commands: the checkpoint they read is corrupt
  2  usage error, a path that does not exist or holds no checkpoint, or a missing
     optional dependency (matplotlib for plot, the demo module)
  3  gc: another process holds the run's writer lock
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

from . import __version__
from ._codec import backend as codec_backend
from ._pointers import DanglingPointerError
from ._read import read_manifest
from ._rundir import info_from
from ._runverify import RunReport, looks_like_checkpoint, resolve_checkpoint, verify_storage
from ._storage import LocalStorage
from ._verify import CheckpointReport, verify_checkpoint
from .errors import CheckpointNotFoundError, CkptError, CorruptCheckpointError, LockedError

OK, PROBLEMS, USAGE, LOCKED = 0, 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, status: int = USAGE) -> None:
        super().__init__(message)
        self.status = status


# -- output -------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """`value` as strict JSON: non-finite floats as "nan"/"inf"/"-inf", tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def emit_json(value: Any) -> None:
    print(json.dumps(jsonable(value), indent=2, allow_nan=False, ensure_ascii=False))


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 200  # scripts and pipes get whole rows
    return Console(file=stream, highlight=False, width=width, soft_wrap=False)


def human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def metric_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.6g}" for k, v in metrics.items())


def first_reason(report: CheckpointReport) -> str:
    if not report.problems:
        return ""
    p = report.problems[0]
    where = ", ".join(
        f"{name} {value}"
        for name, value in (("file", p.file), ("tensor", p.key), ("offset", p.offset))
        if value is not None and f"{name} {value}" not in p.reason
    )
    more = f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
    return f"{p.reason}{f' [{where}]' if where else ''}{more}"


def print_run_extras(out: Console, report: RunReport) -> None:
    for pointer in report.pointers:
        if pointer.status != "absent":
            detail = f" ({pointer.reason})" if pointer.reason else ""
            out.print(f"pointer {pointer.name} -> {pointer.target}: {pointer.status}{detail}")
    for problem in report.problems:
        out.print(f"{problem.status}: {problem.reason}")
    for name in report.leftovers:
        out.print(f"leftover (not an error; the next writer removes it): {name}")
    for name in report.foreign:
        out.print(f"foreign (not ckptstore's; never touched): {name}")


def run_directory(path: str) -> LocalStorage:
    full = os.path.abspath(path)
    if not os.path.isdir(full):
        raise CliError(f"{full}: no such directory")
    return LocalStorage(full)


# -- ls -----------------------------------------------------------------------------------
def ls_rows(storage: LocalStorage, report: RunReport) -> list[dict[str, Any]]:
    infos = {c.name: c for c in report.scan.checkpoints.values()} if report.scan else {}
    rows = []
    for checked in report.checkpoints:
        name = os.path.basename(checked.path)
        info = infos.get(name)
        if info is None:
            try:
                info = info_from(storage, name, read_manifest(storage, name))
            except (CkptError, OSError, AssertionError):
                info = None
        raw = info.raw_bytes if info else None
        stored = info.stored_bytes if info else None
        rows.append(
            {
                "name": name,
                "step": checked.step,
                "created": info.created if info else None,
                "stored_bytes": stored,
                "raw_bytes": raw,
                "ratio": round(stored / raw, 4) if raw and stored is not None else None,
                "metrics": info.metrics if info else {},
                "marks": [p.name for p in report.pointers if p.target == name],
                "status": checked.status,
                "problem": first_reason(checked) or None,
            }
        )
    return rows


def cmd_ls(args: argparse.Namespace) -> int:
    storage = run_directory(args.dir)
    report = verify_storage(storage, deep=False)
    rows = ls_rows(storage, report)
    if args.json:
        body = report.as_dict()
        del body["checkpoints"], body["deep"], body["bytes_checked"]
        emit_json({**body, "checkpoints": rows})
        return OK
    out = console()
    table = Table(title=f"{storage.root}: {len(rows)} checkpoints")
    for column in (
        "step",
        "name",
        "created",
        "stored",
        "raw",
        "ratio",
        "metrics",
        "marks",
        "status",
    ):
        table.add_column(
            column, justify="right" if column in ("step", "stored", "raw", "ratio") else "left"
        )
    for row in rows:
        status = row["status"] if not row["problem"] else f"{row['status']}: {row['problem']}"
        table.add_row(
            str(row["step"]) if row["step"] is not None else "?",
            row["name"],
            (row["created"] or "-")[:19].replace("T", " "),
            human(row["stored_bytes"]),
            human(row["raw_bytes"]),
            f"{row['ratio']:.3f}" if row["ratio"] is not None else "-",
            metric_text(row["metrics"]),
            ",".join(row["marks"]),
            status,
        )
    out.print(table)
    print_run_extras(out, report)
    return OK


# -- verify -------------------------------------------------------------------------------
@contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[int, int, str], None] | None]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (TextColumn("verifying {task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=None)

        def update(index: int, total: int, name: str) -> None:
            bar.update(task, completed=index, total=total, description=name)

        yield update


def cmd_verify(args: argparse.Namespace) -> int:
    storage, name = resolve_checkpoint(args.path)
    if storage.kind(name) is None:
        raise CliError(f"{os.path.join(storage.root, name)}: no such checkpoint or run directory")
    report: CheckpointReport | RunReport
    if storage.kind(name) == "dir" and not looks_like_checkpoint(storage, name):
        run = LocalStorage(os.path.join(storage.root, name))
        with progress_bar(sys.stderr.isatty() and not args.json) as progress:
            report = verify_storage(run, args.deep, progress)
        checks = report.checkpoints
    else:
        report = verify_checkpoint(storage, name, args.deep)
        checks = [report]
    if args.json:
        body = report.as_dict()
        emit_json(body if "kind" in body else {"kind": "checkpoint", **body})
    else:
        out = console()
        table = Table(title=f"{'deep' if args.deep else 'quick'} verification of {report.path}")
        for column in ("step", "name", "status", "reason"):
            table.add_column(column)
        for checked in checks:
            step = "?" if checked.step is None else str(checked.step)
            table.add_row(
                step, os.path.basename(checked.path), checked.status, first_reason(checked)
            )
        out.print(table)
        if isinstance(report, RunReport):
            print_run_extras(out, report)
        out.print(f"{report.status}: {len(checks)} checked, {human(report.bytes_checked)} read")
    if not checks and report.sound:
        print(f"ckptstore verify: no checkpoint in {report.path}", file=sys.stderr)
        return USAGE
    return OK if report.sound else PROBLEMS


# -- inspect ------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from ._inspect import describe

    storage, name = resolve_checkpoint(args.ckpt)
    body = describe(storage, name)
    if args.json:
        emit_json(body)
        return OK
    out = console()
    table = Table(title=f"{body['path']}: step {body['step']}, {len(body['tensors'])} tensors")
    for column in ("key", "dtype", "shape", "bytes", "stored", "note"):
        table.add_column(column, justify="right" if column in ("bytes", "stored") else "left")
    for t in body["tensors"]:
        note = f"shares storage with {t['view_of']}" if t["view_of"] else ""
        table.add_row(
            t["key"], t["dtype"], str(t["shape"]), human(t["bytes"]), human(t["stored_bytes"]), note
        )
    out.print(table)
    out.print(
        f"created {body['created']}, codec {body['codec'].get('name')}, "
        f"{human(body['stored_bytes'])} stored of {human(body['raw_bytes'])} raw"
    )
    out.print(f"metrics: {metric_text(body['metrics']) or '-'}")
    out.print(f"metadata: {json.dumps(jsonable(body['metadata']), ensure_ascii=False)}")
    out.print("versions: " + ", ".join(f"{k} {v}" for k, v in body["versions"].items()))
    return OK


# -- export, gc, plot, demo -----------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from ._export import export_safetensors

    if os.path.exists(args.out) and not args.force:
        raise CliError(f"{args.out} exists; pass --force to replace it")
    result = export_safetensors(args.ckpt, args.out)
    print(
        f"wrote {result.path}: {result.tensors} tensors ({result.aliases} sharing storage, "
        f"each written as its own), {human(result.bytes)}"
    )
    for key, dtype in sorted(result.converted.items()):
        form = "real pairs [..., 2]" if dtype.startswith("complex") else "raw uint8 bytes"
        print(
            f"note: {key} is {dtype}, which safetensors cannot hold; written as {form} "
            "(listed in __metadata__['ckptstore.converted'])",
            file=sys.stderr,
        )
    return OK


def cmd_gc(args: argparse.Namespace) -> int:
    from ._gc import Rules, collect

    rules = Rules(args.keep_last, args.keep_best, args.keep_every, args.metric, args.mode)
    try:
        plan = collect(args.dir, rules, dry_run=args.dry_run)
    except ValueError as error:
        raise CliError(str(error)) from None
    if args.json:
        emit_json(plan.as_dict())
        return OK
    verb = "would delete" if args.dry_run else "deleted"
    for d in plan.delete:
        print(f"{verb} {d.name} (step {d.step}): {'; '.join(d.reasons)}")
    for d in plan.keep:
        print(f"keep {d.name} (step {d.step}): {'; '.join(d.reasons)}")
    for name, why in sorted(plan.untouched.items()):
        print(f"untouched {name}: {why}")
    for name in plan.leftovers:
        print(f"{'would remove' if args.dry_run else 'removed'} crash leftover {name}")
    return OK


def cmd_plot(args: argparse.Namespace) -> int:
    try:
        from ._plot import plot_run

        count = plot_run(args.dir, args.output, args.metric, args.mode)
    except ModuleNotFoundError as error:
        if error.name != "matplotlib" and not str(error.name).startswith("matplotlib."):
            raise
        raise CliError("plot needs matplotlib: pip install 'ckptstore[plot]'") from None
    print(f"wrote {os.path.abspath(args.output)} ({count} checkpoints)")
    return OK


def cmd_demo(args: argparse.Namespace) -> int:
    import importlib

    try:
        demo = importlib.import_module("ckptstore.demo")  # imported only when asked for
    except ModuleNotFoundError as error:
        if error.name in ("ckptstore.demo", None):
            raise CliError(
                "the demo is not part of this installation (no ckptstore.demo)"
            ) from None
        raise CliError(f"the demo needs {error.name}: pip install 'ckptstore[demo]'") from None
    status = demo.main(list(args.args))
    return int(status or 0)


# -- the parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptstore",
        description="Inspect, verify and maintain ckptstore checkpoints from their files alone.",
        epilog="exit status: 0 ok/sound, 1 corrupt or incomplete found, 2 usage error or "
        "missing path, 3 run locked by a writer. See docs/cli.md.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"ckptstore {__version__} (byte-grouping kernel: {codec_backend()})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], text: str, **kw: Any
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, **kw)
        p.set_defaults(handler=handler)
        return p

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--json",
            action="store_true",
            help="strict JSON on stdout (non-finite floats as strings)",
        )

    p = command(
        "ls", cmd_ls, "one row per checkpoint: step, time, sizes, metrics, pointers, status"
    )
    p.add_argument("dir", help="run directory")
    json_flag(p)

    p = command(
        "verify",
        cmd_verify,
        "check a run directory or one checkpoint; exit 0 only when all is sound",
    )
    p.add_argument("path", help="run directory, checkpoint directory, or a best/latest pointer")
    p.add_argument(
        "--deep", action="store_true", help="also read every chunk and tensor and check checksums"
    )
    json_flag(p)

    p = command("inspect", cmd_inspect, "tensors, metrics, metadata and versions of one checkpoint")
    p.add_argument("ckpt", help="checkpoint directory (or a best/latest pointer)")
    json_flag(p)

    p = command("export", cmd_export, "write one checkpoint as a plain .safetensors file")
    p.add_argument("ckpt", help="checkpoint directory (or a best/latest pointer)")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")

    p = command(
        "gc", cmd_gc, "apply retention offline with the manager's rules, under the writer lock"
    )
    p.add_argument("dir", help="run directory")
    p.add_argument("--keep-last", type=int, required=True, metavar="N", help="keep the newest N")
    p.add_argument("--keep-best", type=int, metavar="K", help="also keep the best K by --metric")
    p.add_argument(
        "--keep-every", type=int, metavar="N", help="also keep steps that are multiples of N"
    )
    p.add_argument("--metric", metavar="M", help="metric that ranks checkpoints for --keep-best")
    p.add_argument(
        "--mode",
        choices=("min", "max"),
        default="min",
        help="lower (min) or higher (max) is better",
    )
    p.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    json_flag(p)

    p = command(
        "plot", cmd_plot, "metrics over steps (best marked) and stored size per checkpoint, as PNG"
    )
    p.add_argument("dir", help="run directory")
    p.add_argument("-o", "--output", required=True, metavar="FILE.png", help="image to write")
    p.add_argument(
        "--metric", metavar="M", help="rank by M to mark the best (default: the best pointer)"
    )
    p.add_argument("--mode", choices=("min", "max"), default="min")

    p = command(
        "demo", cmd_demo, "run the ckptstore demo (arguments are passed on)", add_help=False
    )
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["demo"]:
            # Everything after "demo" is the demo's; argparse's REMAINDER would take
            # leading options (`demo --epochs 1`) as ours.
            args = argparse.Namespace(handler=cmd_demo, args=argv[1:])
        else:
            args = parser.parse_args(argv)
        return int(args.handler(args))
    except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else USAGE
    except CliError as error:
        print(f"ckptstore: {error}", file=sys.stderr)
        return error.status
    except LockedError as error:
        print(f"ckptstore: {error}", file=sys.stderr)
        return LOCKED
    except (CheckpointNotFoundError, FileNotFoundError, NotADirectoryError) as error:
        print(f"ckptstore: {error}", file=sys.stderr)
        return USAGE
    except (CorruptCheckpointError, DanglingPointerError) as error:
        print(f"ckptstore: {error} (run `ckptstore verify` for a full report)", file=sys.stderr)
        return PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
