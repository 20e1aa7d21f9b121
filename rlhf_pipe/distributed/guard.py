"""Orphan guards.

- When a rank is killed (SIGKILL), the vLLM engine-core processes it started live on, holding
  memory (and GPUs) and the log pipes. `start()` runs a small process that watches its parent
  rank and, once the parent is gone, kills every process the parent had started (torchrun's
  SIGTERM to the rank's process group does not stop it):

      python -m rlhf_pipe.distributed.guard PARENT_PID

- torchrun starts its workers in sessions of their own, so when a node's agent is killed its
  ranks live on, and the other nodes keep talking to them. `exit_with_agent()` ends a rank
  once its agent is gone; the other nodes' calls to it then fail at once, naming it.

- The agent that serves the c10d rendezvous store is one node's; when that node goes, the
  other agents lose the store and stop their ranks (SIGTERM), maybe before a rank has called
  the lost node. `sigterm_grace()` then asks the store (`answers()`): one that no longer
  answers names its node, which `rendezvous_store()` learned at start from the agents' sockets.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple


def start(parent_pid: int | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_pipe.distributed.guard", str(parent_pid or os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


_SAID = threading.Event()  # this process has said its line


def say(line: str) -> None:
    """One line to stderr in one write: the ranks of a node share the agent's stderr, and
    print() writes the text and its newline apart (unbuffered), so lines interleave."""
    _SAID.set()
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


def sigterm_grace(what: str, why: Callable[[], str] = lambda: "", grace_s: float = 5.0) -> None:
    """On SIGTERM, exit only after `grace_s` (code 1, one line). A node's agent that loses
    the rendezvous store (its host was the node that died) stops its ranks at once, before
    they see their dead peers; the grace lets a rank's own failure line, which names the
    lost node, come out first. `why()` (at most a few seconds) gives the cause where it can
    tell, e.g. '; lost node 1 (...)': that line comes at once; the plain one, after the grace,
    only if the rank has said none. torchrun sends SIGKILL 30 s after SIGTERM in any case."""

    def on_term(signum, frame):
        def later():
            start = time.monotonic()
            cause = why()
            if cause:
                say(f"error: {what}: stopped by torchrun (SIGTERM){cause}")
            time.sleep(max(0.0, grace_s - (time.monotonic() - start)))
            if not _SAID.is_set():
                say(f"error: {what}: stopped by torchrun (SIGTERM)")
            os._exit(1)

        threading.Thread(target=later, name="sigterm-grace", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)


class Store(NamedTuple):
    """The c10d rendezvous store of a torchrun run."""

    host: str  # as this node's agent reaches it
    port: int
    node: int  # the node (GROUP_RANK) whose agent serves it
    ranks: tuple[int, ...]  # that node's ranks


def agent_store(master_port: int, agent: int | None = None) -> tuple[str, int, bool] | None:
    """(host, port, served here) of the one store the torchrun agent (this process's parent)
    is a client of, from its TCP sockets; None when they show no single one. The agent of
    node 0 also serves the workers' store, on MASTER_PORT: that one is left out."""
    import psutil

    try:
        conns = psutil.Process(agent or os.getppid()).net_connections(kind="tcp")
    except psutil.Error:
        return None
    listening = {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}
    stores = {
        (c.raddr.ip, c.raddr.port)
        for c in conns
        if c.status == psutil.CONN_ESTABLISHED
        and c.raddr
        and c.raddr.port != master_port
        and c.laddr.port not in listening  # a client it accepted, not a store it reaches
    }
    if len(stores) != 1:
        return None
    ((host, port),) = stores
    return host.removeprefix("::ffff:"), port, port in listening  # an IPv4 address as IPv6


def rendezvous_store() -> Store | None:
    """The run's rendezvous store and the node that serves it; None where the agents' sockets
    do not tell. A collective on the default group: every rank calls it, once, at start."""
    import torch.distributed as dist

    mine = agent_store(int(os.environ["MASTER_PORT"]))
    node = int(os.environ["GROUP_RANK"])
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, (node, mine))
    servers = {(n, s[1]) for n, s in every if s is not None and s[2]}
    if mine is None or len(servers) != 1:
        return None
    ((served_by, port),) = servers
    if port != mine[1]:
        return None
    ranks = tuple(r for r, (n, _) in enumerate(every) if n == served_by)
    return Store(mine[0], port, served_by, ranks)


def answers(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether a TCP server accepts at host:port within `timeout_s` (refused: its process is
    gone; no answer: its machine or the network)."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


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
