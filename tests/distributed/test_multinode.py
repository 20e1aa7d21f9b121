"""Two "nodes" on one machine: two torchrun agents on localhost meet through a c10d
rendezvous (gloo), hold the ranks `rlhf-pipe plan --nnodes 2` maps to each node, and train as
one process does. Killing one node's agent ends both within 60 s, and the surviving side's
error line names the dead node's ranks and roles.

c10d ignores --node-rank (torchrun says so): it numbers the nodes in the order of its own
sort of the agents, so the tests read each agent's node (GROUP_RANK) from its workers."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, TINY_CONFIG
from tests.distributed.test_torchrun import (
    QUIET,
    _processes,
    _run_survivors,
    _single_process,
    _weights,
)

pytestmark = pytest.mark.slow
NODES = {"placement_config.gpus_per_node": 2, "placement_config.device": "cpu"}


def _plan_nodes() -> dict[int, list[tuple[int, str]]]:
    """node -> [(rank, roles)] from `rlhf-pipe plan --nnodes 2`."""
    cmd = [sys.executable, "-m", "rlhf_pipe", "plan", str(TINY_CONFIG), "--nnodes", "2"]
    for k, v in NODES.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    nodes: dict[int, list] = {}
    for rank, node, roles in re.findall(
        r"^\s*rank\s+(\d+)\s+node (\d+)\s+cpu\s+\d+\s+(\S+)", proc.stdout, re.M
    ):
        nodes.setdefault(int(node), []).append((int(rank), roles))
    return nodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agents(work, steps, nproc_per_node: list[int], extra=()):
    port = _free_port()
    sets = {
        **QUIET,
        **NODES,
        "train_config.work_dir": str(work),
        "train_config.max_train_step": steps,
        **dict(e.split("=", 1) for e in extra),
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    agents = []
    for node, nproc in enumerate(nproc_per_node):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        cmd += ["--node-rank", str(node), "--nproc-per-node", str(nproc)]
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
        cmd += ["-m", "rlhf_pipe.train", str(TINY_CONFIG)]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        agents.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
        agents[-1].rdzv_port = port
    return agents


def _stop(agents):
    for a in agents:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)


def test_two_nodes_train_as_one_process(tmp_path, vllm_engine, initial_policy_weights):
    nodes = _plan_nodes()
    assert sorted(nodes) == [0, 1]
    assert [r for r, _ in nodes[0]] == [0, 1] and [r for r, _ in nodes[1]] == [2, 3]
    agents = _agents(tmp_path / "dist", 2, [len(nodes[0]), len(nodes[1])])
    try:
        outs = [a.communicate(timeout=600) for a in agents]
    finally:
        _stop(agents)
    for a, (_, err) in zip(agents, outs):
        assert a.returncode == 0, "\n".join(x for x in err.splitlines() if "error" in x.lower())
    assert sum("trained to step 2" in out for out, _ in outs) == 1  # the controller's node
    single = _single_process(tmp_path / "single", vllm_engine, initial_policy_weights, 2)
    dist_ckpt = tmp_path / "dist" / "checkpoints" / "step_000002"
    for part in ("actor", "critic"):
        a, b = _weights(dist_ckpt / part), _weights(single / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    rewards = lambda w: [json.loads(x)["reward"] for x in (w / "metrics.jsonl").open()]
    assert rewards(tmp_path / "dist") == rewards(tmp_path / "single" / "run")


def _node_of_agents(agents) -> tuple[dict[int, int], bytes]:
    """agent index -> the node (GROUP_RANK) torchrun gave it, from its workers; and the
    run's MASTER_PORT, which tells its processes (and their children) from other runs'."""
    parent, env_of = _processes()
    out, port = {}, None
    for i, agent in enumerate(agents):
        for pid, vars_ in env_of.items():
            if parent.get(pid) == agent.pid and b"GROUP_RANK" in vars_:
                out[i], port = int(vars_[b"GROUP_RANK"]), vars_[b"MASTER_PORT"]
    return out, port


def _store_host(agents) -> int:
    """Which agent serves the c10d rendezvous store (both were given the same endpoint; the
    first to bind it serves it)."""
    import psutil

    for i, a in enumerate(agents):
        for conn in psutil.Process(a.pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == a.rdzv_port:
                return i
    raise AssertionError("no agent listens on the rendezvous port")


@pytest.mark.parametrize("kill_store_host", [False, True])
def test_killed_node_ends_both_within_60s_naming_it(tmp_path, kill_store_host):
    """Killing the agent that does not serve the rendezvous store: the survivor names the lost
    node's ranks and roles. Killing the one that serves it: the survivor's own agent loses the
    store and stops its ranks, so both still end within 60 s, but the ranks may be stopped
    before their line names the node (a known limit, issue 17's note)."""
    nodes = _plan_nodes()
    work = tmp_path / "dist"
    agents = _agents(work, 200, [len(nodes[0]), len(nodes[1])])
    try:
        deadline = time.monotonic() + 300
        while not (work / "metrics.jsonl").exists():  # both nodes are in their steps
            assert all(a.poll() is None for a in agents), agents[0].stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        node_of, port = _node_of_agents(agents)
        assert sorted(node_of.values()) == [0, 1], node_of
        host = _store_host(agents)
        victim = host if kill_store_host else 1 - host
        victim_node = node_of[victim]
        survivor = agents[1 - victim]
        os.kill(agents[victim].pid, signal.SIGKILL)  # the agent only: its ranks live on
        killed_at = time.monotonic()
        _, stderr = survivor.communicate(timeout=90)
        elapsed = time.monotonic() - killed_at
        deadline = killed_at + 60
        while _run_survivors(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        gone = time.monotonic() - killed_at
    finally:
        _stop(agents)
    assert survivor.returncode != 0
    assert elapsed < 60 and gone < 60, (elapsed, gone)
    assert not _run_survivors(port), "a process of the run outlived it"
    named = ", ".join(f"rank {r} {roles}" for r, roles in nodes[victim_node])
    lines = [x for x in stderr.splitlines() if x.startswith("error: rank")]
    print(f"victim node {victim_node}: ended in {elapsed:.1f} s; {lines}")
    if kill_store_host:
        return
    assert any(x.endswith(f"; lost node {victim_node} ({named})") for x in lines), stderr[-3000:]
