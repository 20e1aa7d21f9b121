"""The controller's side of the NCCL weight sync (rlhf_pipe.rollout.nccl_sync).

One sync: the actor broadcasts its bucketed weights and every engine receives them, all at
once (each side blocks in the broadcast until the others join, so the calls run in threads).
The group is built on the first sync: the actor picks an address, then the actor and every
engine's workers join it. Engine e's workers take ranks `1 + sum(tp of engines before e)`
onwards; the actor is rank 0.
"""

from __future__ import annotations

import time

from rlhf_pipe.distributed.remote import run_all


class NcclWeightSync:
    def __init__(
        self, actor, engines: list, tp_sizes: list[int], bucket_bytes: int, timeout_s: float
    ):
        self.actor, self.engines, self.tp_sizes = actor, engines, tp_sizes
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.layout = None
        self.last_sync: dict = {}

    def _init(self) -> None:
        host, port = self.actor.weight_sync_address()
        world = 1 + sum(self.tp_sizes)
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.engines))]
        run_all(
            [lambda: self.actor.init_weight_sender(host, port, world)]
            + [
                (lambda e=e, off=off: e.init_weight_group(host, port, off, world))
                for e, off in zip(self.engines, offsets)
            ],
            self.timeout_s,
            "joining the NCCL weight-sync group",
        )
        # The layout is fixed for the run: names, shapes and dtypes do not change.
        self.layout = self.actor.weight_layout(self.bucket_bytes)

    def __call__(self, version: int) -> dict:
        if self.layout is None:
            self._init()
        start = time.perf_counter()
        sent = run_all(
            [lambda: self.actor.broadcast_weights(self.layout)]
            + [(lambda e=e: e.receive_weights(self.layout, version)) for e in self.engines],
            self.timeout_s,
            "broadcasting the NCCL weight sync",
        )[0]
        seconds = time.perf_counter() - start
        self.last_sync = {
            "seconds": seconds,
            "bytes": sent,
            "gbps": sent / max(seconds, 1e-9) / 1e9,
        }
        return self.last_sync
