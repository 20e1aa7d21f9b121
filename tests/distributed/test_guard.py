"""distributed/guard.py on the CPU: one-write lines, the orphan guard kills what its parent
started once the parent is gone, the rendezvous store read off an agent's sockets, and the
SIGTERM grace with its line."""

import os
import signal
import subprocess
import sys
import time

import psutil

from rlhf_pipe.distributed import guard


def test_say_writes_one_line_to_stderr(capfd):
    guard.say("error: rank 2 (critic): gone")
    assert capfd.readouterr().err == "error: rank 2 (critic): gone\n"


def test_the_guard_kills_the_children_of_a_dead_parent():
    # parent: starts the guard on itself and a long sleep, prints the sleep's pid, then exits
    code = (
        "import subprocess, sys, time\n"
        "from rlhf_pipe.distributed import guard\n"
        "guard.start()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(1.5)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    parent = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
    )
    child = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != "zombie":
        assert time.monotonic() < deadline, "the orphan outlived its parent by 10 s"
        time.sleep(0.2)


def test_the_guard_outlives_a_sigterm_to_the_group_and_kills_what_ignored_it():
    # torchrun stops a rank with SIGTERM to its process group; a stopped child (an engine
    # core that hangs) keeps the signal pending, and only the guard can end it.
    code = (
        "import os, signal, subprocess, sys, time\n"
        "from rlhf_pipe.distributed import guard\n"
        "guard.start()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "time.sleep(1)  # the guard has seen the child\n"
        "os.kill(child.pid, signal.SIGSTOP)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    child = int(parent.stdout.readline())
    os.killpg(parent.pid, signal.SIGTERM)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    try:
        while psutil.pid_exists(child) and psutil.Process(child).status() != "zombie":
            assert time.monotonic() < deadline, "the stopped child outlived its parent by 10 s"
            time.sleep(0.2)
    finally:
        if psutil.pid_exists(child):
            os.kill(child, signal.SIGKILL)


def _child(code: str) -> tuple[subprocess.Popen, str]:
    """A child python running `code`, and the first line it prints (once it is set up)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    return proc, proc.stdout.readline().strip()


# A stand-in for a torchrun agent: serves a store and the workers' store (MASTER_PORT), and is
# a client of both, as the agent of node 0 is when it also serves the rendezvous store.
SERVING_AGENT = """
import socket, time
def serve():
    s = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(s.getsockname())
    return s, client, s.accept()[0]
store, master = serve(), serve()
print(store[0].getsockname()[1], master[0].getsockname()[1], flush=True)
time.sleep(60)
"""


def test_agent_store_reads_the_store_off_the_agents_sockets():
    host, line = _child(SERVING_AGENT)
    try:
        store, master = map(int, line.split())
        assert guard.agent_store(master, agent=host.pid) == ("127.0.0.1", store, True)
        code = f"import socket, time; c = socket.create_connection(('127.0.0.1', {store}))\n"
        client, _ = _child(code + "print(flush=True); time.sleep(60)")
        try:
            assert guard.agent_store(master, agent=client.pid) == ("127.0.0.1", store, False)
        finally:
            client.kill()
        # its two clients (store and workers' store) with MASTER_PORT unknown: no single store
        assert guard.agent_store(0, agent=host.pid) is None
    finally:
        host.kill()


def test_answers_until_the_server_is_gone():
    host, line = _child(SERVING_AGENT)
    store = int(line.split()[0])
    assert guard.answers("127.0.0.1", store)
    host.kill()
    host.wait()
    assert not guard.answers("127.0.0.1", store)


def _sigterm(why: str, said: str = "") -> subprocess.CompletedProcess:
    code = (
        "import time\n"
        "from rlhf_pipe.distributed import guard\n"
        f"guard.sigterm_grace('rank 0 (rollout)', lambda: {why!r}, grace_s=1.0)\n"
        + (f"guard.say({said!r})\n" if said else "")
        + "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    proc, _ = _child(code)
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    _, err = proc.communicate(timeout=20)
    assert 0.9 < time.monotonic() - start < 10  # the grace, then the exit
    assert proc.returncode == 1
    return err


def test_sigterm_says_the_cause_at_once_and_exits_after_the_grace():
    assert _sigterm("; lost node 1 (rank 2 critic)") == (
        "error: rank 0 (rollout): stopped by torchrun (SIGTERM); lost node 1 (rank 2 critic)\n"
    )


def test_sigterm_without_a_cause_says_so_unless_the_rank_said_its_line():
    assert _sigterm("") == "error: rank 0 (rollout): stopped by torchrun (SIGTERM)\n"
    assert _sigterm("", said="error: rank 0 (rollout) failed: X") == (
        "error: rank 0 (rollout) failed: X\n"
    )


def test_a_lost_store_names_its_node_only_once_it_is_gone(monkeypatch):
    from rlhf_pipe import train

    class Placement:
        def roles_of(self, rank):
            return {2: ("critic",), 3: ("reference",)}.get(rank, ())

    host, line = _child(SERVING_AGENT)
    store = guard.Store("127.0.0.1", int(line.split()[0]), 1, (2, 3))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setitem(train._CURRENT, "placement", Placement())
    monkeypatch.setitem(train._CURRENT, "store", store)
    assert train._lost_store() == ""  # it answers: the SIGTERM had another cause
    host.kill()
    host.wait()
    assert train._lost_store() == (
        f": the rendezvous store at 127.0.0.1:{store.port}, served by node 1, does not answer"
        "; lost node 1 (rank 2 critic, rank 3 reference)"
    )
    monkeypatch.setenv("RANK", "2")
    assert train._lost_store() == ""  # its own node: its agent is gone, not the peer's
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setitem(train._CURRENT, "named", True)
    assert train._lost_store() == ""  # the rank's own line named the lost node already
