"""Actor -> vLLM weight sync through one staging buffer shared with an engine core that runs in
a process of its own on the actor's device: a CUDA IPC allocation on a GPU, a file in /dev/shm
on a CPU.

The buffer holds the largest bucket of the layout (rlhf_pipe.distributed.buckets) and is
opened once by every worker of the engine. A sync writes each bucket into it on the actor's
side, then one RPC has the worker load views of it with the model's own loader, as from a
checkpoint; the worker synchronizes its device before it answers, so the next bucket may
overwrite the buffer. No tensor is pickled or written to a file per sync, and on a GPU the
weights never leave the device.

`SharedBufferReceiver` is mixed into vLLM's worker class through `worker_extension_cls`, so its
methods run inside the engine core's process and are reached with `LLM.collective_rpc`.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable, Iterable

import torch

from rlhf_pipe.distributed.buckets import Bucket, unpack

RECEIVER_CLS = "rlhf_pipe.rollout.shared_sync.SharedBufferReceiver"
__all__ = ["RECEIVER_CLS", "SharedBufferReceiver", "SharedBufferSender"]

_ALIGN = 256  # bytes: every dtype's view of the buffer starts aligned


def _bucket_bytes(bucket: Bucket) -> int:
    return bucket.numel * getattr(torch, bucket.dtype).itemsize


def _view(buffer: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """The bucket's flat tensor over the first bytes of the (uint8) buffer."""
    return buffer[: _bucket_bytes(bucket)].view(getattr(torch, bucket.dtype))


def _cuda_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    # CUDA IPC shares whole allocations of the caching allocator; its expandable segments
    # are not shareable in every torch release, so this one buffer is a plain allocation.
    expandable = "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if expandable:
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    try:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    finally:
        if expandable:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")


class SharedBufferSender:
    """The actor's end: the buffer, and the handle the workers open it with (plain types, as
    vLLM's RPC carries them)."""

    def __init__(self, layout: Iterable[Bucket], device: torch.device):
        layout = [Bucket._make(b) for b in layout]
        nbytes = max(_bucket_bytes(b) for b in layout)
        nbytes = -(-nbytes // _ALIGN) * _ALIGN
        self.device, self.path = device, None
        if device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            self.buffer = _cuda_buffer(nbytes, device)
            # Pickled here and loaded by the engine core, a process this one started: the
            # rebuild function and its arguments are torch's own IPC handle.
            self.handle = {"kind": "cuda", "ipc": pickle.dumps(reduce_tensor(self.buffer))}
        else:
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, self.path = tempfile.mkstemp(prefix="rlhf_pipe_weights_", dir=folder)
            os.close(fd)
            self.buffer = torch.from_file(self.path, shared=True, size=nbytes, dtype=torch.uint8)
            self.handle = {"kind": "file", "path": self.path, "nbytes": nbytes}

    @torch.no_grad()
    def send(
        self,
        named_tensors,
        layout: Iterable[Bucket],
        load_bucket: Callable[[Bucket, bool], object],
    ) -> int:
        """Write each bucket into the buffer and have the workers load it
        (`load_bucket(bucket, last)`); returns the bytes sent."""
        tensors = dict(named_tensors)
        layout = [Bucket._make(b) for b in layout]
        nbytes = 0
        for i, bucket in enumerate(layout):
            flat = _view(self.buffer, bucket)
            for name, view in unpack(bucket, flat):
                source = tensors[name]
                if source.shape != view.shape or source.dtype != flat.dtype:
                    raise RuntimeError(
                        f"actor weight {name!r} ({source.dtype}, {tuple(source.shape)}) does not "
                        f"match the sync layout ({flat.dtype}, {tuple(view.shape)})"
                    )
                view.copy_(source)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # before the other reads
            load_bucket(bucket, i == len(layout) - 1)
            nbytes += _bucket_bytes(bucket)
        return nbytes

    def close(self) -> None:
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)
        self.path = None

    def __del__(self):
        self.close()


def open_shared_buffer(handle: dict) -> torch.Tensor:
    if handle["kind"] == "cuda":
        rebuild, args = pickle.loads(handle["ipc"])
        return rebuild(*args)
    return torch.from_file(handle["path"], shared=True, size=handle["nbytes"], dtype=torch.uint8)


class SharedBufferReceiver:
    """Methods added to each vLLM worker (worker_extension_cls)."""

    def rlhf_pipe_open_shared_buffer(self, handle: dict) -> None:
        self._rlhf_pipe_buffer = open_shared_buffer(handle)
        self._rlhf_pipe_pending: list[tuple[Bucket, torch.Tensor]] = []

    @torch.no_grad()
    def rlhf_pipe_load_shared_bucket(self, bucket, last: bool) -> None:
        bucket = Bucket._make(bucket)  # the RPC may turn it into a plain list
        flat = _view(self._rlhf_pipe_buffer, bucket)
        if self.device.type == "cuda":
            self.model_runner.model.load_weights(unpack(bucket, flat))
            torch.cuda.synchronize(self.device)  # the sender overwrites the buffer next
            return
        # On the CPU, vLLM's linear layers keep packed copies of their weights made after
        # loading, which only its layerwise reload of every weight makes again (as in
        # nccl_sync): the buckets are kept until the last one, then reloaded together.
        self._rlhf_pipe_pending.append((bucket, flat.clone()))
        if last:
            pending, self._rlhf_pipe_pending = self._rlhf_pipe_pending, []
            self.reload_weights(weights_iterator=(nt for b, f in pending for nt in unpack(b, f)))
