"""The NCCL sync's pure parts, on CPU: the bucket layout both ends agree on, and the deadline
that turns a dead peer in a broadcast into an error (the transfer itself: tests/gpu)."""

import threading
import time

import pytest
import torch

from rlhf_pipe.distributed.remote import run_all
from rlhf_pipe.rollout.nccl_sync import bucket_layout


def test_bucket_layout_packs_in_order_by_dtype_and_size():
    named = [
        ("a", torch.zeros(4, 4)),
        ("b", torch.zeros(8)),
        ("c", torch.zeros(2, dtype=torch.bfloat16)),
        ("d", torch.zeros(100)),
        ("e", torch.zeros(3)),
    ]
    layout = bucket_layout(named, bucket_bytes=100)
    # a (64 B) + b (32 B) fit in 100 B; c changes dtype; d (400 B) is alone; e starts anew.
    assert [[n for n, *_ in entries] for _, entries, _ in layout] == [
        ["a", "b"],
        ["c"],
        ["d"],
        ["e"],
    ]
    assert [d for d, _, _ in layout] == ["float32", "bfloat16", "float32", "float32"]
    assert layout[0][1] == [("a", (4, 4), 0, 16), ("b", (8,), 16, 8)]
    assert [numel for _, _, numel in layout] == [24, 2, 100, 3]


def test_bucket_views_rebuild_every_tensor():
    torch.manual_seed(0)
    named = [(f"w{i}", torch.randn(i + 1, 3)) for i in range(6)]
    for _, entries, numel in bucket_layout(named, bucket_bytes=60):
        flat = torch.cat([dict(named)[n].reshape(-1) for n, *_ in entries])
        assert flat.numel() == numel
        for name, shape, offset, size in entries:
            assert torch.equal(flat[offset : offset + size].view(shape), dict(named)[name])


def test_a_peer_that_never_joins_is_an_error_within_the_deadline():
    never = threading.Event()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no progress broadcasting for 1 s"):
        run_all([lambda: None, never.wait], 1.0, "broadcasting")
    assert time.monotonic() - start < 3


def test_the_first_error_of_a_side_is_raised():
    def fail():
        raise RuntimeError("actor rank gone")

    with pytest.raises(RuntimeError, match="actor rank gone"):
        run_all([fail, lambda: None], 5.0, "broadcasting")
