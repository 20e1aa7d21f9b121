"""distributed/guard.py on the CPU: one-write lines, and the orphan guard kills what its
parent started once the parent is gone."""

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
