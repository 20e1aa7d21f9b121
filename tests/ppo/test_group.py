"""Tests for rlhf_pipe.ppo.group: hand cases, slow per-group twins, hypothesis properties."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_pipe.ppo.group import (
    broadcast_to_tokens,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def grpo_reference(scores, group_ids, eps, scale_by_std=True, unbiased=True):
    """One group at a time with torch's own mean/std (a group of one: std taken as 0)."""
    out = torch.zeros_like(scores)
    for gid in group_ids.unique():
        sel = group_ids == gid
        s = scores[sel]
        if torch.all(s == s[0]):
            continue  # an all-equal group gets exactly 0 (the mean's rounding would leave ~1e-8)
        adv = s - s.mean()
        if scale_by_std:
            std = s.std(unbiased=unbiased) if len(s) > 1 else s.new_zeros(())
            adv = adv / (std + eps)
        out[sel] = adv
    return out


# --------------------------------------------------------------------------- GRPO


def test_grpo_by_hand_interleaved_non_contiguous_ids():
    # group 10: [1, 2, 3] -> mean 2, sum of squares 2, sample std sqrt(2/2) = 1;
    # group 3: [0, 4] -> mean 2, sum of squares 8, sample std sqrt(8/1) = 2 sqrt 2
    scores = t([1.0, 0.0, 2.0, 4.0, 3.0])
    group_ids = torch.tensor([10, 3, 10, 3, 10])
    r8 = math.sqrt(8.0)
    expected = t([-1.0, -2.0 / r8, 0.0, 2.0 / r8, 1.0])
    torch.testing.assert_close(grpo_advantages(scores, group_ids, eps=0.0), expected)
    # scale_by_std=False: just r - mean
    torch.testing.assert_close(
        grpo_advantages(scores, group_ids, scale_by_std=False), t([-1.0, -2.0, 0.0, 2.0, 1.0])
    )
    # default eps 1e-6 enters the denominator: group 3 gives -2 / (2 sqrt 2 + 1e-6)
    torch.testing.assert_close(grpo_advantages(scores, group_ids)[1], t(-2.0 / (r8 + 1e-6)))


def test_grpo_population_std_by_hand():
    # population std: group 10 sqrt(2/3), group 3 sqrt(8/2) = 2
    scores = t([1.0, 0.0, 2.0, 4.0, 3.0])
    group_ids = torch.tensor([10, 3, 10, 3, 10])
    s = math.sqrt(2.0 / 3.0)
    expected = t([-1 / s, -1.0, 0.0, 1.0, 1 / s])
    pop = grpo_advantages(scores, group_ids, eps=0.0, unbiased=False)
    torch.testing.assert_close(pop, expected)
    # the two differ by sqrt(n / (n - 1)): sqrt(3/2) for the group of 3, sqrt 2 for the pair
    sample = grpo_advantages(scores, group_ids, eps=0.0)
    ratio = t([math.sqrt(1.5), math.sqrt(2.0), 1.0, math.sqrt(2.0), math.sqrt(1.5)])
    torch.testing.assert_close(pop[[0, 1, 3, 4]], (sample * ratio)[[0, 1, 3, 4]])


def test_grpo_all_equal_group_is_exactly_zero():
    # in float64 (0.1 + 0.1 + 0.1) / 3 - 0.1 = -1.4e-17, which divided by eps would be -1.4e-11;
    # the group must still give exactly 0
    group_ids = torch.tensor([0, 0, 0, 1, 1])
    for dtype in (F64, torch.float32):
        scores = t([0.1, 0.1, 0.1, 1.0, 0.0], dtype)
        for scale in (True, False):
            for unbiased in (True, False):
                adv = grpo_advantages(scores, group_ids, scale_by_std=scale, unbiased=unbiased)
                assert torch.equal(adv[:3], torch.zeros(3, dtype=dtype))
                assert adv[3] > 0 and adv[4] < 0


def test_grpo_singleton_group_is_zero_and_dtype_kept():
    # a group of one: r - mean = 0, and its n - 1 = 0 must not give 0 / 0 = NaN
    scores = torch.tensor([5.0, 1.0, 2.0], dtype=torch.float32)
    for unbiased in (True, False):
        adv = grpo_advantages(scores, torch.tensor([0, 1, 1]), eps=0.0, unbiased=unbiased)
        assert adv[0] == 0.0 and adv.dtype == torch.float32 and torch.isfinite(adv).all()
    # the pair [1, 2], mean 1.5: population std 0.5 -> -+0.5 / 0.5 = -+1 (the last loop pass);
    # sample std sqrt(0.5 / 1) -> -+0.5 / sqrt(0.5) = -+sqrt(0.5)
    torch.testing.assert_close(adv[1:], torch.tensor([-1.0, 1.0]))
    adv = grpo_advantages(scores, torch.tensor([0, 1, 1]), eps=0.0)
    torch.testing.assert_close(adv[1:], torch.tensor([-(0.5**0.5), 0.5**0.5]))


def test_grpo_does_not_mutate_inputs():
    scores = t([1.0, 2.0, 3.0, 3.0])
    group_ids = torch.tensor([1, 1, 0, 0])
    copies = scores.clone(), group_ids.clone()
    grpo_advantages(scores, group_ids)
    rloo_advantages(scores, group_ids)
    assert torch.equal(scores, copies[0]) and torch.equal(group_ids, copies[1])


group_sizes = st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=5)


@st.composite
def grouped_scores(draw):
    sizes = draw(group_sizes)
    B = sum(sizes)
    values = draw(st.lists(st.floats(-100, 100, allow_nan=False, width=64), min_size=B, max_size=B))
    group_ids = torch.repeat_interleave(torch.arange(len(sizes)) * 7, torch.tensor(sizes))
    perm = torch.tensor(draw(st.permutations(list(range(B)))), dtype=torch.long)
    return t(values), group_ids[perm]


@settings(max_examples=60, deadline=None)
@given(grouped_scores(), st.booleans())
def test_grpo_property_group_mean_zero_and_matches_reference(data, unbiased):
    scores, group_ids = data
    adv = grpo_advantages(scores, group_ids, unbiased=unbiased)
    for gid in group_ids.unique():
        sel = group_ids == gid
        assert abs(adv[sel].mean()) < 1e-9
    expected = grpo_reference(scores, group_ids, 1e-6, unbiased=unbiased)
    torch.testing.assert_close(adv, expected, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- RLOO


def test_rloo_by_hand():
    scores = t([1.0, 0.0, 2.0, 4.0, 3.0, 7.0])
    group_ids = torch.tensor([0, 1, 0, 1, 0, 2])
    # group 0 [1, 2, 3]: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5
    # group 1 [0, 4]: 0 - 4 = -4, 4 - 0 = 4; group 2 has one member -> 0
    expected = t([-1.5, -4.0, 0.0, 4.0, 1.5, 0.0])
    torch.testing.assert_close(rloo_advantages(scores, group_ids), expected)


def test_rloo_all_equal_group_is_exactly_zero():
    # float64: 0.1 - (0.3000...04 - 0.1) / 2 is a rounding residue, not 0
    for value in (0.1, 0.7, 1e-3):
        scores = t([value] * 3)
        adv = rloo_advantages(scores, torch.zeros(3, dtype=torch.long))
        assert torch.equal(adv, torch.zeros(3, dtype=F64))


@settings(max_examples=40, deadline=None)
@given(grouped_scores())
def test_rloo_property_scaled_mean_centering(data):
    # r_i - (S - r_i)/(n - 1) = n/(n - 1) * (r_i - mean), for groups of 2 or more
    scores, group_ids = data
    adv = rloo_advantages(scores, group_ids)
    for gid in group_ids.unique():
        sel = group_ids == gid
        n = int(sel.sum())
        s = scores[sel]
        expected = torch.zeros_like(s) if n == 1 else n / (n - 1) * (s - s.mean())
        torch.testing.assert_close(adv[sel], expected, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- REINFORCE++


def reinforce_pp_reference(rewards, lengths, gamma):
    """Plain loops for return-to-go, then whitening with torch over the valid tokens."""
    B, T = len(rewards), len(rewards[0])
    rtg = [[0.0] * T for _ in range(B)]
    for b in range(B):
        running = 0.0
        for i in reversed(range(lengths[b])):
            running = rewards[b][i] + gamma * running
            rtg[b][i] = running
    valid = torch.tensor([rtg[b][i] for b in range(B) for i in range(lengths[b])], dtype=F64)
    mean, std = valid.mean(), valid.std(unbiased=False)
    out = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        for i in range(lengths[b]):
            out[b, i] = (rtg[b][i] - mean) / std
    return out


def test_reinforce_pp_by_hand():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])  # the 5 is padding
    mask = t([[1, 1, 1], [1, 1, 0]])
    # return-to-go (gamma 1): [[1, 1, 1], [2, 2, -]]; valid mean 7/5 = 1.4
    # population var = (3 * 0.16 + 2 * 0.36) / 5 = 0.24
    s = math.sqrt(0.24)
    expected = t([[-0.4 / s, -0.4 / s, -0.4 / s], [0.6 / s, 0.6 / s, 0.0]])
    out = reinforce_pp_advantages(rewards, mask)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_reinforce_pp_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 0, 4]
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    rewards = torch.randn(4, 5, generator=g, dtype=F64)
    for gamma in (1.0, 0.9, 0.0):
        out = reinforce_pp_advantages(rewards, mask, gamma)
        ref = reinforce_pp_reference(rewards.tolist(), lengths, gamma)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        valid = out[mask]
        torch.testing.assert_close(valid.mean(), t(0.0), rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- broadcast


def test_broadcast_to_tokens_by_hand():
    adv = t([2.0, -1.0])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    expected = t([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
    torch.testing.assert_close(broadcast_to_tokens(adv, mask), expected)
