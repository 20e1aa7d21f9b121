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

# (dtype name, [(name, shape, offset, numel)], bucket numel): the same on both ends.
BucketLayout = list[tuple[str, list[tuple[str, tuple[int, ...], int, int]], int]]

RECEIVER_CLS = "rlhf_pipe.rollout.nccl_sync.WeightReceiver"


def bucket_layout(named_tensors, bucket_bytes: int) -> BucketLayout:
    """Group tensors (in order) into same-dtype buckets of at most `bucket_bytes`; a tensor
    larger than that gets a bucket of its own."""
    layout, entries, size, dtype = [], [], 0, None
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if entries and (t.dtype != dtype or size + nbytes > bucket_bytes):
            layout.append((str(dtype).removeprefix("torch."), entries, size // dtype.itemsize))
            entries, size = [], 0
        entries.append((name, tuple(t.shape), size // t.element_size(), t.numel()))
        size += nbytes
        dtype = t.dtype
    if entries:
        layout.append((str(dtype).removeprefix("torch."), entries, size // dtype.itemsize))
    return layout


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
        for dtype_name, entries, numel in layout:
            # One copy per bucket on the GPU; the broadcast then moves it in one call.
            flat = torch.cat([tensors[name].reshape(-1) for name, _, _, _ in entries])
            if flat.numel() != numel or str(flat.dtype) != f"torch.{dtype_name}":
                raise RuntimeError(
                    f"actor weights do not match the sync layout at {entries[0][0]!r}"
                )
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
        for dtype_name, entries, numel in layout:
            flat = torch.empty(numel, dtype=getattr(torch, dtype_name), device=self.device)
            self._rlhf_pipe_comm.broadcast(flat, src=0, stream=stream)
            model.load_weights(
                (name, flat[offset : offset + size].view(shape))
                for name, shape, offset, size in entries
            )
        stream.synchronize()
