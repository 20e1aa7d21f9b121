"""distributed/weight_sync.py on the CPU: the group's ranks (actor 0, then each engine's
workers), one layout for the run, timed syncs, and run-ahead's snapshots, with stand-in
engines; then the gloo communicator itself, a real actor role's snapshot broadcast to a
receiver in another thread. The NCCL transfer runs in tests/gpu; vLLM's receiving end runs
in the torchrun tests (tests/distributed/test_torchrun*.py, 'gloo_direct')."""

import threading

import torch

from rlhf_pipe.builders import build_roles
from rlhf_pipe.distributed.buckets import empty, unpack
from rlhf_pipe.distributed.weight_sync import DirectWeightSync
from rlhf_pipe.protocols import Role
from rlhf_pipe.rollout.nccl_sync import _communicator, free_address
from tests.conftest import tiny_config


class Actor:
    def __init__(self):
        self.calls = []

    def weight_sync_address(self):
        return "127.0.0.1", 1234

    def init_weight_sender(self, host, port, world, backend, timeout_s):
        self.calls.append(("sender", host, port, world, backend, timeout_s))

    def weight_layout(self, bucket_bytes):
        self.calls.append(("layout", bucket_bytes))
        return ["layout"]

    def snapshot_weights(self, version):
        self.calls.append(("snapshot", version))

    def broadcast_weights(self, layout, version=None):
        self.calls.append(("broadcast", version))
        return 4096  # bytes sent


class Engine:
    def __init__(self):
        self.calls = []

    def init_weight_group(self, host, port, offset, world, backend, timeout_s):
        self.calls.append(("group", offset, world, backend))

    def receive_weights(self, layout, version):
        self.calls.append(("receive", layout, version))


def test_ranks_layout_and_sync():
    actor, engines = Actor(), [Engine(), Engine(), Engine()]
    sync = DirectWeightSync(actor, engines, tp_sizes=[2, 1, 4], bucket_bytes=64, timeout_s=10)
    first = sync(1)
    sync(2)
    # world 1 + 2 + 1 + 4; engine e starts after the actor and the engines before it
    assert actor.calls[:2] == [("sender", "127.0.0.1", 1234, 8, "nccl", 10), ("layout", 64)]
    assert [e.calls[0] for e in engines] == [
        ("group", 1, 8, "nccl"),
        ("group", 3, 8, "nccl"),
        ("group", 4, 8, "nccl"),
    ]
    assert engines[2].calls[1:] == [("receive", ["layout"], 1), ("receive", ["layout"], 2)]
    assert first["bytes"] == 4096 and first["seconds"] >= 0 and first["gbps"] > 0


def test_run_ahead_snapshots_are_broadcast_by_version_and_the_group_built_on_first_use():
    actor, engines = Actor(), [Engine(), Engine()]
    sync = DirectWeightSync(actor, engines, [1, 1], 64, 10, backend="gloo")
    sync.snapshot(1)  # the trainer, after an optimizer step: no group needed yet
    sync.snapshot(2)
    assert actor.calls == [("snapshot", 1), ("snapshot", 2)]
    stats = sync.send_snapshot(1)  # the generation thread, engines idle
    assert actor.calls[2:] == [
        ("sender", "127.0.0.1", 1234, 3, "gloo", 10),
        ("layout", 64),
        ("broadcast", 1),
    ]
    assert engines[1].calls == [("group", 2, 3, "gloo"), ("receive", ["layout"], 1)]
    assert stats["bytes"] == 4096 and sync.last_sync is stats


def test_gloo_group_sends_the_snapshot_not_the_live_weights(tmp_path):
    """A real actor role (the tiny policy) on a gloo sync group of two ranks, the receiver in
    another thread: broadcast_weights(layout, v) sends the bytes snapshot v held, while the
    live weights have moved on, and drops that snapshot."""
    cfg = tiny_config(tmp_path)
    actor = build_roles(cfg, [Role.ACTOR], 0, torch.device("cpu"))[Role.ACTOR]
    host, port = "127.0.0.1", free_address()[1]
    received, errors = {}, []
    layout = actor.weight_layout(1 << 16)  # several buckets

    def receiver():
        try:
            comm = _communicator("gloo", host, port, 1, 2, torch.device("cpu"), 30)
            for bucket in layout:
                flat = empty(bucket)
                comm.broadcast(flat)
                received.update((n, t.clone()) for n, t in unpack(bucket, flat))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=receiver)
    thread.start()
    actor.init_weight_sender(host, port, 2, "gloo", 30)
    actor.snapshot_weights(7)
    want = {n: t.clone() for n, t in actor.named_weights()}
    with torch.no_grad():
        for p in actor.model.parameters():
            p.add_(1.0)  # training goes on after the snapshot
    sent = actor.broadcast_weights(layout, 7)
    thread.join(30)
    assert not errors, errors
    assert received.keys() == want.keys()
    assert all(torch.equal(received[n], want[n]) for n in want)
    assert sent == sum(t.numel() * t.element_size() for t in want.values())
    assert actor._snapshots == {}
