"""Actor -> vLLM weight sync straight from the actor's rank, in flat buckets: over NCCL, GPU to
GPU ('nccl'), or over a gloo group of its own ('gloo_direct', the CPU twin).

The actor rank is rank 0 of a private group; every vLLM worker of every engine joins it at
`rank_offset + its tensor-parallel rank`. The group is built outside torchrun's world (the vLLM
workers are not members of it): NCCL with vLLM's `StatelessProcessGroup` and
`PyNcclCommunicator`, gloo with torch's `ProcessGroupGloo` over a TCP store of its own. A sync
is one broadcast per bucket: the actor packs its weights into flat same-dtype buckets on its
device, every worker receives each bucket into one buffer and loads views of it with the
model's own loader (so vLLM's fused layers are filled exactly as from a checkpoint). Nothing
passes through the controller.

With run-ahead (train_config.max_staleness >= 1) the engines load a step's weights later, while
the actor trains on: `WeightSender.snapshot` keeps a copy of each published version on the
actor's device, and `send(version=v)` broadcasts that copy, then drops it.

`WeightReceiver` is mixed into vLLM's worker class through `worker_extension_cls`, so its
methods run inside each worker process and are reached with `LLM.collective_rpc`.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch

from rlhf_pipe.distributed.buckets import Bucket, bucket_layout, empty, flatten, unpack

BucketLayout = list[Bucket]  # the same on both ends
__all__ = ["BucketLayout", "WeightReceiver", "WeightSender", "bucket_layout", "free_address"]

RECEIVER_CLS = "rlhf_pipe.rollout.nccl_sync.WeightReceiver"


def free_address() -> tuple[str, int]:
    """This host's address and a free TCP port for the group's store."""
    host = socket.gethostbyname(socket.gethostname())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return host, s.getsockname()[1]


class _Nccl:
    """NCCL has no timeout of its own: the controller's deadline (run_all) stands for it."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device, timeout_s):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self.comm = PyNcclCommunicator(group, device=device)
        self.stream = torch.cuda.current_stream(device)

    def broadcast(self, flat: torch.Tensor) -> None:
        self.comm.broadcast(flat, src=0, stream=self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class _Gloo:
    """A gloo group of the sync's ranks alone; rank 0 serves its store. Blocking calls with
    the run's timeout (train_config.stage_timeout_s), so a peer that never joins is an error."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device, timeout_s):
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        self.group = dist.ProcessGroupGloo(store, rank, world_size, timeout)

    def broadcast(self, flat: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([flat], opts).wait()

    def synchronize(self) -> None:
        pass  # each broadcast has returned when its wait() did


def _communicator(backend: str, host: str, port: int, rank: int, world_size: int, device, t):
    if backend == "nccl":
        return _Nccl(host, port, rank, world_size, device, t)
    if backend == "gloo":
        return _Gloo(host, port, rank, world_size, device, t)
    raise ValueError(f"weight sync backend: expected 'nccl' or 'gloo', got {backend!r}")


class WeightSender:
    """The actor's end: rank 0 of the sync group, and the device snapshots of run-ahead."""

    def __init__(
        self,
        host: str,
        port: int,
        world_size: int,
        device: torch.device,
        backend: str = "nccl",
        timeout_s: float = 600.0,
    ):
        self.device = device
        self.comm = _communicator(backend, host, port, 0, world_size, device, timeout_s)

    @staticmethod
    @torch.no_grad()
    def snapshot(named_tensors) -> dict[str, torch.Tensor]:
        """A copy of the weights on their own device (the live ones train on)."""
        return {name: t.detach().clone() for name, t in named_tensors}

    @torch.no_grad()
    def send(self, named_tensors, layout: BucketLayout) -> int:
        """Broadcast the weights bucket by bucket; returns the bytes sent."""
        tensors = dict(named_tensors)
        nbytes = 0
        for bucket in layout:
            flat = flatten(tensors, bucket)  # one copy per bucket on the device, one broadcast
            self.comm.broadcast(flat)
            nbytes += flat.numel() * flat.element_size()
        self.comm.synchronize()
        return nbytes


class WeightReceiver:
    """Methods added to each vLLM worker (worker_extension_cls)."""

    def rlhf_pipe_init_weight_group(
        self,
        host: str,
        port: int,
        rank_offset: int,
        world_size: int,
        backend: str = "nccl",
        timeout_s: float = 600.0,
    ) -> None:
        from vllm.distributed.parallel_state import get_tp_group

        rank = rank_offset + get_tp_group().rank_in_group
        self._rlhf_pipe_comm = _communicator(
            backend, host, port, rank, world_size, self.device, timeout_s
        )

    @torch.no_grad()
    def rlhf_pipe_receive_weights(self, layout: BucketLayout) -> None:
        buckets = [Bucket._make(b) for b in layout]  # the RPC may turn them into plain lists
        comm = self._rlhf_pipe_comm
        if self.device.type == "cuda":
            model = self.model_runner.model
            for bucket in buckets:
                flat = empty(bucket, self.device)
                comm.broadcast(flat)
                model.load_weights(unpack(bucket, flat))
            comm.synchronize()
            return

        # On the CPU, vLLM's linear layers keep packed copies of their weights (oneDNN, sgl
        # kernels) made after loading; only its layerwise reload makes them again, as the
        # gloo path's reload_weights does. Buckets arrive as the loader asks for them.
        def received():
            for bucket in buckets:
                flat = empty(bucket, self.device)
                comm.broadcast(flat)
                yield from unpack(bucket, flat)

        self.reload_weights(weights_iterator=received())
