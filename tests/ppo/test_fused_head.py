"""The fused head path against the plain one: log-probs, entropy and gradients, on random
tensors and on the tiny Llama policy, padded and packed."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipe.ppo import core
from rlhf_pipe.ppo.fused_head import linear_logprobs


def _plain(hidden, weight, bias, labels):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return core.logprobs_from_logits(logits, labels), core.entropy_from_logits(logits)


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 100])
def test_float64_values_and_gradients_equal_the_plain_path(chunk_rows):
    g = torch.Generator().manual_seed(0)
    N, H, V = 7, 5, 11
    hidden = torch.randn(N, H, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, dtype=torch.float64, generator=g)

    logp, entropy = linear_logprobs(hidden, weight, labels, chunk_rows, bias)
    want_logp, want_entropy = _plain(hidden, weight, bias, labels)
    torch.testing.assert_close(logp, want_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-12)
    assert not entropy.requires_grad

    got = torch.autograd.grad((logp * upstream).sum(), (hidden, weight, bias))
    want = torch.autograd.grad((want_logp * upstream).sum(), (hidden, weight, bias))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 6, (4,), generator=g)
    assert torch.autograd.gradcheck(
        lambda h, w: linear_logprobs(h, w, labels, 3, with_entropy=False)[0], (hidden, weight)
    )


def test_bfloat16_within_rounding_of_the_plain_path():
    g = torch.Generator().manual_seed(2)
    N, H, V = 33, 16, 257
    hidden = torch.randn(N, H, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    logp, entropy = linear_logprobs(hidden, weight, labels, 8)
    want_logp, want_entropy = _plain(hidden, weight, None, labels)
    assert logp.dtype == torch.float32
    # Both upcast the same bf16 logits: equal up to float32 reduction order.
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    gh, gw = torch.autograd.grad(logp.sum(), (hidden, weight))
    wh, ww = torch.autograd.grad(want_logp.sum(), (hidden, weight))
    # The weight gradient is summed over chunks in float32, the plain one in one bf16 matmul.
    torch.testing.assert_close(gh.float(), wh.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), ww.float(), rtol=2e-2, atol=2e-2)


def test_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_logprobs(torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), 0)


@pytest.mark.parametrize("packed", [False, True])
def test_tiny_policy_fused_equals_plain(tiny_assets, packed):
    from rlhf_pipe.models import fused_head_supported, load_causal_lm, response_logprobs
    from rlhf_pipe.pipeline.batch import Sample, collate

    model = load_causal_lm(str(tiny_assets.policy), "float32")
    assert fused_head_supported(model)
    g = torch.Generator().manual_seed(3)
    samples = [
        Sample(
            i,
            i,
            0,
            torch.randint(3, 500, (p,), generator=g),
            torch.randint(3, 500, (r,), generator=g),
            "",
            "",
        )
        for i, (p, r) in enumerate([(5, 9), (3, 2), (7, 6)])
    ]
    batch = collate(samples, 0, packed)
    mask = batch.response_mask
    fused_logp, fused_entropy = response_logprobs(model, batch, 4, with_entropy=True)
    grads_fused = torch.autograd.grad(
        core.masked_sum(fused_logp, mask), model.parameters(), allow_unused=True
    )
    plain_logp, plain_entropy = response_logprobs(model, batch, 0, with_entropy=True)
    grads_plain = torch.autograd.grad(
        core.masked_sum(plain_logp, mask), model.parameters(), allow_unused=True
    )
    torch.testing.assert_close(fused_logp * mask, plain_logp * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_entropy * mask, plain_entropy * mask, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_fused, grads_plain):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
