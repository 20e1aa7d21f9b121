"""Two "nodes" on one machine: two torchrun agents on localhost meet through a c10d
rendezvous (gloo), hold the ranks `rlhf-pipe plan --nnodes 2` maps to each node, and train as
one process does. Killing one node's agent ends both within 60 s, and the surviving side's
error line names the dead node's ranks and roles, also when the dead agent served the
rendezvous store.

c10d ignores --node-rank (torchrun says so): it numbers the nodes in the order of its own
sort of the agents (on one host, by pid), so the tests read each agent's node (GROUP_RANK)
from its workers."""

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


def _agents(work, steps, nproc_per_node: list[int], extra=(), store_on_node_1=False):
    """One torchrun agent per node. `store_on_node_1`: the first agent waits in a shell that
    execs it once the second listens on the rendezvous port; it keeps the shell's pid, the
    smaller, which c10d makes node 0 on one host. So node 1 serves the store."""
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
        gate = store_on_node_1 and node == 0
        if gate:
            cmd = ["sh", "-c", 'read go; exec "$@"', "sh", *cmd]
        agents.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE if gate else None,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
        agents[-1].rdzv_port = port
    if store_on_node_1:
        deadline = time.monotonic() + 120
        while not _listens(agents[1]):
            assert agents[1].poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        agents[0].stdin.write("go\n")
        agents[0].stdin.flush()  # communicate() closes it
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


def _listens(agent) -> bool:
    """Whether the agent serves the c10d rendezvous store (both were given the same endpoint;
    the first to bind it serves it)."""
    import psutil

    return any(
        conn.status == psutil.CONN_LISTEN and conn.laddr.port == agent.rdzv_port
        for conn in psutil.Process(agent.pid).net_connections(kind="tcp")
    )


def _store_host(agents) -> int:
    """Which agent serves the rendezvous store."""
    hosts = [i for i, a in enumerate(agents) if _listens(a)]
    assert len(hosts) == 1, "no agent listens on the rendezvous port"
    return hosts[0]


def _in_steps(agents, work) -> tuple[dict[int, int], bytes, int]:
    """Wait until both nodes are in their steps; then agent -> node, MASTER_PORT, and which
    agent serves the rendezvous store."""
    deadline = time.monotonic() + 300
    while not (work / "metrics.jsonl").exists():
        assert all(a.poll() is None for a in agents), agents[0].stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    node_of, port = _node_of_agents(agents)
    assert sorted(node_of.values()) == [0, 1], node_of
    return node_of, port, _store_host(agents)


def _kill(victim, survivor, port, also=()) -> list[str]:
    """SIGKILL the victim agent only (its ranks live on); check both nodes, and every process
    of the run (and the pids `also`), end within 60 s; the survivor's error lines."""
    import psutil

    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def left():
        return _run_survivors(port) + [p for p in also if alive(p)]

    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    _, stderr = survivor.communicate(timeout=90)
    elapsed = time.monotonic() - killed_at
    while left() and time.monotonic() < killed_at + 60:
        time.sleep(0.5)
    gone = time.monotonic() - killed_at
    assert survivor.returncode != 0
    assert elapsed < 60 and gone < 60, (elapsed, gone)
    assert not left(), "a process of the run outlived it"
    lines = [x for x in stderr.splitlines() if x.startswith("error: rank")]
    print(f"ended in {elapsed:.1f} s, all gone in {gone:.1f} s; {lines}")
    return lines


def _naming(nodes, node: int) -> str:
    """The end of a line that names `node` as lost."""
    return f"; lost node {node} ({', '.join(f'rank {r} {roles}' for r, roles in nodes[node])})"


@pytest.mark.parametrize("kill_store_host", [False, True])
def test_killed_node_ends_both_within_60s_naming_it(tmp_path, kill_store_host):
    """Either agent killed, the survivor names the lost node's ranks and roles, and no other
    node. Killing the one that does not serve the rendezvous store: a rank's failed call names
    it. Killing the one that serves it: the survivor's own agent loses the store and stops
    its ranks (SIGTERM), maybe before they call the lost node; each then finds the store gone
    and names the node whose agent served it."""
    nodes = _plan_nodes()
    work = tmp_path / "dist"
    agents = _agents(work, 200, [len(nodes[0]), len(nodes[1])])
    try:
        node_of, port, host = _in_steps(agents, work)
        victim = host if kill_store_host else 1 - host
        lines = _kill(agents[victim], agents[1 - victim], port)
    finally:
        _stop(agents)
    naming = _naming(nodes, node_of[victim])
    assert not [x for x in lines if "; lost node" in x and not x.endswith(naming)], lines
    assert any(x.endswith(naming) for x in lines), lines


def test_store_host_killed_while_the_controller_waits_is_named_on_sigterm(tmp_path):
    """The case no failed call can name: node 1 serves the store, the controller's vLLM engine
    core is stopped (SIGSTOP), so once the micro-batches in flight are through no rank calls
    node 1; then node 1's agent is killed. Node 0's agent loses the store and stops its
    ranks, and the controller's SIGTERM line names node 1 from the store it finds gone."""
    import psutil

    nodes = _plan_nodes()
    work = tmp_path / "dist"
    agents = _agents(work, 200, [len(nodes[0]), len(nodes[1])], store_on_node_1=True)
    try:
        node_of, port, host = _in_steps(agents, work)
        assert node_of[host] == 1, (node_of, host)
        survivor = agents[1 - host]
        cores = [
            p
            for p in psutil.Process(survivor.pid).children(recursive=True)
            if p.name() == "VLLM::EngineCore"
        ]
        assert cores
        for p in cores:
            p.send_signal(signal.SIGSTOP)  # the controller's guard kills it in the end
        time.sleep(5)  # every stage now waits on generation
        lines = _kill(agents[host], survivor, port, also=[p.pid for p in cores])
    finally:
        _stop(agents)
    controller = next(r for r, roles in nodes[0] if "rollout" in roles)
    assert any(
        x.startswith(f"error: rank {controller} ")
        and "stopped by torchrun (SIGTERM): the rendezvous store at " in x
        and x.endswith(_naming(nodes, 1))
        for x in lines
    ), lines
    assert not [x for x in lines if "; lost node" in x and not x.endswith(_naming(nodes, 1))]
