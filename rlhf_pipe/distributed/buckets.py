"""Named tensors as flat same-dtype buckets, and back: the one codec of both weight paths.

The gloo path (rlhf_pipe.distributed.remote) sends each bucket as one host tensor; the NCCL
path (rlhf_pipe.rollout.nccl_sync) broadcasts each on the GPU, with the layout agreed once.
Either way a sync is one message per bucket, never one per parameter, and the receiver loads
views of the bucket (no copy per tensor).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch

Entry = tuple[str, tuple[int, ...], int, int]  # (name, shape, offset, numel) in the bucket


class Bucket(NamedTuple):
    """One flat bucket's layout: the same on both ends."""

    dtype: str  # torch dtype name, e.g. "float32"
    entries: list[Entry]
    numel: int


def _groups(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, to_host: bool):
    """Consecutive runs of tensors of one dtype and at most `bucket_bytes` (a larger tensor is
    a run of its own). One pass: a ZeRO-3 generator gathers each tensor once."""
    run: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        if to_host:
            t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if run and (t.dtype != run[-1][1].dtype or size + nbytes > bucket_bytes):
            yield run
            run, size = [], 0
        run.append((name, t))
        size += nbytes
    if run:
        yield run


def _layout(run: list[tuple[str, torch.Tensor]]) -> Bucket:
    entries, offset = [], 0
    for name, t in run:
        entries.append((name, tuple(t.shape), offset, t.numel()))
        offset += t.numel()
    return Bucket(str(run[0][1].dtype).removeprefix("torch."), entries, offset)


def bucket_layout(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> list[Bucket]:
    """The buckets `named_tensors` (in order) fall into; nothing is copied."""
    return [_layout(run) for run in _groups(named_tensors, bucket_bytes, to_host=False)]


def pack(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, to_host: bool = True
) -> list[tuple[Bucket, torch.Tensor]]:
    """(layout, flat tensor) per bucket; `to_host` copies each tensor to host memory first."""
    return [
        (_layout(run), torch.cat([t.reshape(-1) for _, t in run]))
        for run in _groups(named_tensors, bucket_bytes, to_host)
    ]


def flatten(tensors: dict[str, torch.Tensor], bucket: Bucket) -> torch.Tensor:
    """The flat tensor of `bucket` from tensors by name, on their device (a layout agreed
    before: the NCCL sync)."""
    flat = torch.cat([tensors[name].reshape(-1) for name, _, _, _ in bucket.entries])
    if flat.numel() != bucket.numel or str(flat.dtype) != f"torch.{bucket.dtype}":
        raise RuntimeError(
            f"actor weights do not match the sync layout at {bucket.entries[0][0]!r}"
        )
    return flat


def empty(bucket: Bucket, device: torch.device | str = "cpu") -> torch.Tensor:
    """A buffer to receive `bucket` into."""
    return torch.empty(bucket.numel, dtype=getattr(torch, bucket.dtype), device=device)


def unpack(bucket: Bucket, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view of `flat`) for every tensor of the bucket."""
    for name, shape, offset, numel in bucket.entries:
        yield name, flat[offset : offset + numel].view(shape)


def nbytes(layout: Iterable[Bucket]) -> int:
    """Bytes of the buckets of a layout (plain tuples too, as a layout may travel)."""
    return sum(numel * getattr(torch, dtype).itemsize for dtype, _, numel in layout)
