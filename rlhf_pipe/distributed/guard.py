"""Orphan guards.

- When a rank is killed (SIGKILL), the vLLM engine-core processes it started live on, holding
  memory (and GPUs) and the log pipes. `start()` runs a small process that watches its parent
  rank and, once the parent is gone, kills every process the parent had started (torchrun's
  SIGTERM to the rank's process group does not stop it):

      python -m rlhf_pipe.distributed.guard PARENT_PID

- torchrun starts its workers in sessions of their own, so when a node's agent is killed its
  ranks live on, and the other nodes keep talking to them. `exit_with_agent()` ends a rank
  once its agent is gone; the other nodes' calls to it then fail at once, naming it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def start(parent_pid: int | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_pipe.distributed.guard", str(parent_pid or os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def say(line: str) -> None:
    """One line to stderr in one write: the ranks of a node share the agent's stderr, and
    print() writes the text and its newline apart (unbuffered), so lines interleave."""
    os.write(2, (line + "\n").encode(errors="replace"))


def exit_with_agent(what: str, poll_s: float = 0.5) -> threading.Thread:
    """Exit this process (code 1, one line on stderr) soon after its parent is gone. `what`
    names this process in the line, e.g. 'rank 2 (critic)'."""
    agent = os.getppid()

    def body():
        while os.getppid() == agent:
            time.sleep(poll_s)
        say(f"error: {what}: its torchrun agent (pid {agent}) is gone; exiting")
        os._exit(1)  # no clean-up: the peers it would wait for may be gone too

    thread = threading.Thread(target=body, name="agent-watch", daemon=True)
    thread.start()
    return thread


def sigterm_grace(what: str, grace_s: float = 5.0) -> None:
    """On SIGTERM, exit only after `grace_s` (code 1, one line). A node's agent that loses
    the rendezvous store (its host was the node that died) stops its ranks at once, before
    they see their dead peers; the grace lets a rank's own failure line, which names the
    lost node, come out first. torchrun sends SIGKILL 30 s after SIGTERM in any case."""

    def on_term(signum, frame):
        def later():
            time.sleep(grace_s)
            say(f"error: {what}: stopped by torchrun (SIGTERM)")
            os._exit(1)

        threading.Thread(target=later, name="sigterm-grace", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)


def _descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def watch(parent: int, poll_s: float = 0.5) -> None:
    # torchrun stops a rank with SIGTERM to its process group, this guard's too: the guard
    # must outlive the rank, to kill what does not stop on SIGTERM (a stopped or hung engine).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
