"""distributed/buckets.py: the weight codec. Buckets hold one dtype, stay under the byte
limit (a larger tensor goes alone), and unpack gives every tensor back by name."""

import pytest
import torch

from rlhf_pipe.distributed import buckets


def _named():
    return [
        ("a", torch.arange(6, dtype=torch.float32).view(2, 3)),  # 24 bytes
        ("b", torch.ones(2, dtype=torch.float32)),  # 8 bytes
        ("c", torch.zeros(3, dtype=torch.bfloat16)),  # 6 bytes, other dtype
        ("d", torch.full((10,), 2.0)),  # 40 bytes > limit: alone
    ]


def test_layout_splits_by_dtype_and_size():
    layout = buckets.bucket_layout(_named(), bucket_bytes=32)
    assert [(b.dtype, [e[0] for e in b.entries], b.numel) for b in layout] == [
        ("float32", ["a", "b"], 8),
        ("bfloat16", ["c"], 3),
        ("float32", ["d"], 10),
    ]
    assert layout[0].entries[1] == ("b", (2,), 6, 2)  # (name, shape, offset, numel)
    assert buckets.nbytes(layout) == 8 * 4 + 3 * 2 + 10 * 4


def test_pack_then_unpack_gives_every_tensor_back():
    named = dict(_named())
    out = {}
    for bucket, flat in buckets.pack(_named(), bucket_bytes=32):
        out.update(buckets.unpack(bucket, flat))
    assert out.keys() == named.keys()
    for name, t in named.items():
        assert torch.equal(out[name], t)


def test_flatten_checks_the_agreed_layout():
    layout = buckets.bucket_layout(_named(), bucket_bytes=32)
    tensors = dict(_named())
    flat = buckets.flatten(tensors, layout[0])
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 1, 1]
    recv = buckets.empty(layout[0])
    assert recv.shape == (8,) and recv.dtype == torch.float32
    tensors["b"] = torch.ones(3)
    with pytest.raises(RuntimeError, match="'a'"):
        buckets.flatten(tensors, layout[0])
