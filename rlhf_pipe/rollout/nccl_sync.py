"""Actor -> vLLM weight sync over NCCL, GPU to GPU, in flat buckets.

The actor rank is rank 0 of a private NCCL group; every vLLM worker of every engine joins it
at `rank_offset + its tensor-parallel rank`. The group is built with vLLM's
`StatelessProcessGroup` (a TCP store of its own), because the vLLM workers are not members of
torchrun's world. A sync is one broadcast per bucket: the actor packs its weights into flat
same-dtype buckets on its GPU, every worker receives each bucket into one buffer and loads
views of it with the model's own `load_weights` (so vLLM's fused layers are filled exactly as
from a checkpoint). Nothing passes through host memory.

`WeightReceiver` is mixed into vLLM's worker class through `worker_extension_cls`, so its
methods run inside each worker process and are reached with `LLM.collective_rpc`.
"""

from __future__ import annotations

import socket

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


def _communicator(host: str, port: int, rank: int, world_size: int, device):
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=device)


class WeightSender:
    """The actor's end: rank 0 of the sync group."""

    def __init__(self, host: str, port: int, world_size: int, device: torch.device):
        self.device = device
        self.comm = _communicator(host, port, 0, world_size, device)

    @torch.no_grad()
    def send(self, named_tensors, layout: BucketLayout) -> int:
        """Broadcast the weights bucket by bucket; returns the bytes sent."""
        tensors = dict(named_tensors)
        stream = torch.cuda.current_stream(self.device)
        nbytes = 0
        for bucket in layout:
            flat = flatten(tensors, bucket)  # one copy per bucket on the GPU, one broadcast
            self.comm.broadcast(flat, src=0, stream=stream)
            nbytes += flat.numel() * flat.element_size()
        stream.synchronize()
        return nbytes


class WeightReceiver:
    """Methods added to each vLLM worker (worker_extension_cls)."""

    def rlhf_pipe_init_weight_group(
        self, host: str, port: int, rank_offset: int, world_size: int
    ) -> None:
        from vllm.distributed.parallel_state import get_tp_group

        rank = rank_offset + get_tp_group().rank_in_group
        self._rlhf_pipe_comm = _communicator(host, port, rank, world_size, self.device)

    @torch.no_grad()
    def rlhf_pipe_receive_weights(self, layout: BucketLayout) -> None:
        model = self.model_runner.model
        stream = torch.cuda.current_stream(self.device)
        for bucket in map(Bucket._make, layout):  # the RPC may turn it into plain lists
            flat = empty(bucket, self.device)
            self._rlhf_pipe_comm.broadcast(flat, src=0, stream=stream)
            model.load_weights(unpack(bucket, flat))
        stream.synchronize()
