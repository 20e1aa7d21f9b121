"""Orphan guard: when a rank is killed (SIGKILL), the vLLM engine-core processes it started
live on, holding memory (and GPUs) and the log pipes. This small process watches its parent
rank and, once the parent is gone, kills every process the parent had started.

    python -m rlhf_pipe.distributed.guard PARENT_PID
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def start(parent_pid: int | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_pipe.distributed.guard", str(parent_pid or os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def watch(parent: int, poll_s: float = 0.5) -> None:
    me = os.getpid()
    known: set[int] = set()
    while os.getppid() == parent:
        known |= _descendants(parent) - {me}
        time.sleep(poll_s)
    for pid in known:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
