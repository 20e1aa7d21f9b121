"""distributed/weight_sync.py on the CPU, with stand-in actor and engines: the group's ranks
(actor 0, then each engine's workers), one layout for the run, and a timed sync. The NCCL
transfer itself runs in tests/gpu."""

from rlhf_pipe.distributed.weight_sync import NcclWeightSync


class Actor:
    def __init__(self):
        self.calls = []

    def weight_sync_address(self):
        return "127.0.0.1", 1234

    def init_weight_sender(self, host, port, world):
        self.calls.append(("sender", host, port, world))

    def weight_layout(self, bucket_bytes):
        self.calls.append(("layout", bucket_bytes))
        return ["layout"]

    def broadcast_weights(self, layout):
        return 4096  # bytes sent


class Engine:
    def __init__(self):
        self.calls = []

    def init_weight_group(self, host, port, offset, world):
        self.calls.append(("group", offset, world))

    def receive_weights(self, layout, version):
        self.calls.append(("receive", layout, version))


def test_ranks_layout_and_sync():
    actor, engines = Actor(), [Engine(), Engine(), Engine()]
    sync = NcclWeightSync(actor, engines, tp_sizes=[2, 1, 4], bucket_bytes=64, timeout_s=10)
    first = sync(1)
    sync(2)
    # world 1 + 2 + 1 + 4; engine e starts after the actor and the engines before it
    assert actor.calls == [("sender", "127.0.0.1", 1234, 8), ("layout", 64)]
    assert [e.calls[0] for e in engines] == [("group", 1, 8), ("group", 3, 8), ("group", 4, 8)]
    assert engines[2].calls[1:] == [("receive", ["layout"], 1), ("receive", ["layout"], 2)]
    assert first["bytes"] == 4096 and first["seconds"] >= 0 and first["gbps"] > 0
