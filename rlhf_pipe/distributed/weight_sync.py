"""The controller's side of the direct weight sync (rlhf_pipe.rollout.nccl_sync): the actor's
rank broadcasts to every vLLM worker, over NCCL ('nccl') or gloo ('gloo_direct').

One sync: the actor broadcasts its bucketed weights and every engine receives them, all at
once (each side blocks in the broadcast until the others join, so the calls run in threads).
The group is built on the first sync: the actor picks an address, then the actor and every
engine's workers join it. Engine e's workers take ranks `1 + sum(tp of engines before e)`
onwards; the actor is rank 0.

Run-ahead (max_staleness >= 1): `snapshot(v)` (the trainer, after each optimizer step) keeps
a copy of the weights on the actor's device; `send_snapshot(v)` (the generation thread,
between two generates, engines idle) broadcasts it. The actor's rank serves one request at a
time, so the broadcast waits for at most the one train call being served; that call needs
nothing from the engines, and the engines wait only for the broadcast: no cycle. A ZeRO
actor's other data-parallel ranks are not part of it (the snapshot and the broadcast go to
the first rank alone and hold no ZeRO collective).
"""

from __future__ import annotations

import time

from rlhf_pipe.distributed.remote import run_all


class DirectWeightSync:
    """`backend`: 'nccl' (GPU to GPU) or 'gloo' (host memory, no GPU needed)."""

    def __init__(
        self,
        actor,
        engines: list,
        tp_sizes: list[int],
        bucket_bytes: int,
        timeout_s: float,
        backend: str = "nccl",
    ):
        self.actor, self.engines, self.tp_sizes = actor, engines, tp_sizes
        self.bucket_bytes, self.timeout_s, self.backend = bucket_bytes, timeout_s, backend
        self.layout = None
        self.last_sync: dict = {}

    def _init(self) -> None:
        host, port = self.actor.weight_sync_address()
        world = 1 + sum(self.tp_sizes)
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.engines))]
        b, t = self.backend, self.timeout_s
        run_all(
            [lambda: self.actor.init_weight_sender(host, port, world, b, t)]
            + [
                (lambda e=e, off=off: e.init_weight_group(host, port, off, world, b, t))
                for e, off in zip(self.engines, offsets)
            ],
            self.timeout_s,
            f"joining the {self.backend} weight-sync group",
        )
        # The layout is fixed for the run: names, shapes and dtypes do not change.
        self.layout = self.actor.weight_layout(self.bucket_bytes)

    def __call__(self, version: int) -> dict:
        return self._broadcast(version, None)

    def snapshot(self, version: int) -> None:
        self.actor.snapshot_weights(version)

    def send_snapshot(self, version: int) -> dict:
        return self._broadcast(version, version)

    def _broadcast(self, version: int, snapshot: int | None) -> dict:
        if self.layout is None:  # here, not at start: the engines are idle now
            self._init()
        start = time.perf_counter()
        sent = run_all(
            [lambda: self.actor.broadcast_weights(self.layout, snapshot)]
            + [(lambda e=e: e.receive_weights(self.layout, version)) for e in self.engines],
            self.timeout_s,
            f"broadcasting the {self.backend} weight sync",
        )[0]
        seconds = time.perf_counter() - start
        self.last_sync = {
            "seconds": seconds,
            "bytes": sent,
            "gbps": sent / max(seconds, 1e-9) / 1e9,
        }
        return self.last_sync
