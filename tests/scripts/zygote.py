"""Start `train_run.py` runs as fresh processes without paying for `import torch` each time.

Importing torch and torch._dynamo (which every optimizer pulls in) takes seconds here,
more than a whole training run. This process imports them once, never trains, has one
thread, and for each request forks a child that runs `train_run.main()` with the given
command line as if started from a shell: the child's stderr goes to a file, it exits
through the interpreter's normal path (atexit included) or dies by a signal. State
passes between runs only through the run directory, as between real restarts.

Protocol, one JSON object per line: the test writes {"argv": [...], "stderr": PATH};
the zygote answers {"pid": N} at once, then {"status": S} when the child is gone
(S is the exit code, or minus the signal that killed it).
"""

from __future__ import annotations

import json
import os
import sys
import threading

import numpy  # noqa: F401
import torch
import torch._dynamo

import ckptstore  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_run


def serve() -> None:
    assert threading.active_count() == 1, threading.enumerate()
    torch.set_num_threads(torch.get_num_threads())  # as a fresh process has it
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            fd = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            sys.argv = ["train_run.py", *request["argv"]]
            train_run.main()
            sys.exit(0)  # unwinds out of this loop: a normal interpreter exit
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)


if __name__ == "__main__":
    serve()
