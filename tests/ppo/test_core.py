"""Tests for rlhf_pipe.ppo.core: hand-computed cases, slow reference twins, invariances."""

import math

import pytest
import torch

from rlhf_pipe.ppo.core import (
    RunningMoments,
    aggregate,
    entropy_from_logits,
    gae_advantages,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_whiten,
    normalize,
    policy_loss,
    ptx_loss,
    seq_mean_token_mean,
    token_rewards,
    value_loss,
)

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def ragged_mask(lengths, T):
    """(B, T) float64 mask, left-aligned rows of the given lengths."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(F64)


# --------------------------------------------------------------------------- masked reductions


def test_masked_sum_and_mean_by_hand():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # all: 1 + 2 + 4 = 7; per row: [1 + 2, 4] = [3, 4]
    assert masked_sum(x, mask) == 7.0
    torch.testing.assert_close(masked_sum(x, mask, dim=-1), t([3.0, 4.0]))
    # mean: 7 / 3; per row: [3 / 2, 4 / 1]
    torch.testing.assert_close(masked_mean(x, mask), t(7.0 / 3.0))
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), t([1.5, 4.0]))


def test_masked_mean_bool_mask_and_empty_row():
    x = t([[1.0, 2.0], [5.0, 7.0]])
    mask = torch.tensor([[True, True], [False, False]])
    # row 0: (1 + 2) / 2 = 1.5; row 1 has no valid token -> 0, not NaN
    torch.testing.assert_close(masked_mean(x, mask, dim=1), t([1.5, 0.0]))


def test_masked_whiten_by_hand():
    x = t([1.0, 2.0, 3.0, 100.0])
    mask = t([1, 1, 1, 0])
    # mean over valid = 2, population var = (1 + 0 + 1) / 3 = 2/3, the 100 is ignored
    s = math.sqrt(2.0 / 3.0)
    out = masked_whiten(x, mask, eps=0.0)
    torch.testing.assert_close(out[:3], t([-1 / s, 0.0, 1 / s]))
    # shift_mean=False adds the mean (2) back
    out = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    torch.testing.assert_close(out[:3], t([2 - 1 / s, 2.0, 2 + 1 / s]))


def test_masked_whiten_matches_torch_on_valid_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=F64) * 3 + 1
    mask = ragged_mask([6, 3, 0, 5], 6)
    valid = x[mask.bool()]
    expected = (valid - valid.mean()) / valid.std(unbiased=False)
    torch.testing.assert_close(masked_whiten(x, mask, eps=0.0)[mask.bool()], expected)


# --------------------------------------------------------------------------- log-probs, entropy


def test_logprobs_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = t([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    labels = torch.tensor([[1, 0]])
    expected = t([[math.log(0.75), math.log(0.25)]])
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)


def test_logprobs_match_log_softmax_gather_with_grad():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 5, 11, generator=g) * 4).requires_grad_()
    labels = torch.randint(0, 11, (3, 5), generator=g)
    ours = logprobs_from_logits(logits, labels)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(ours, ref)
    w = torch.randn(3, 5, generator=g)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(g_ours, g_ref)


def test_logprobs_bf16_input_is_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 4, 50, generator=g) * 5).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 4), generator=g)
    ours = logprobs_from_logits(logits, labels)
    assert ours.dtype == torch.float32
    # reference on the same (bf16-rounded) values, in float64
    ref = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


def test_entropy_by_hand_and_against_reference():
    # uniform over 4 -> ln 4; p = [1/4, 3/4] -> -(1/4 ln 1/4 + 3/4 ln 3/4)
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4]]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy_from_logits(logits), t([[math.log(4.0), h]]))
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 7, generator=g, dtype=F64)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(entropy_from_logits(z), -(p * torch.log(p)).sum(-1))
    assert entropy_from_logits(z.to(torch.bfloat16)).dtype == torch.float32


def test_ptx_loss_by_hand():
    logits = t([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    labels = torch.tensor([[1, 1]])
    mask = t([[1, 0]])
    # NLL of p = 3/4 is -ln(3/4); the padded token gives 0
    torch.testing.assert_close(ptx_loss(logits, labels, mask), t([[-math.log(0.75), 0.0]]))


# --------------------------------------------------------------------------- KL and rewards


def test_kl_penalty_kinds_by_hand():
    logp = t([-1.0, -2.0])
    ref = t([-1.5, -1.0])
    # d = logp - ref = [0.5, -1.0]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), t([0.5, -1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref), t([0.5, -1.0]))  # default k1
    # 0.5 * d^2 = [0.125, 0.5]
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), t([0.125, 0.5]))
    # exp(ref - logp) - (ref - logp) - 1 = [e^-0.5 + 0.5 - 1, e^1 - 1 - 1]
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), t([math.exp(-0.5) - 0.5, math.e - 2.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "abs"), t([0.5, 1.0]))


def test_kl_k3_is_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(4)
    logp, ref = torch.randn(2, 100, generator=g, dtype=F64)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert torch.equal(kl_penalty(logp, logp, "k3"), torch.zeros_like(logp))


def test_kl_penalty_capped_at_ten_with_finite_gradients():
    # float32, as the pipeline's log-probs; d = logp - ref = [-5, 12, -100, 0.5]
    ref = torch.zeros(4)
    logp = torch.tensor([-5.0, 12.0, -100.0, 0.5], requires_grad=True)
    # k3 = e^-d + d - 1 = [e^5 - 6 = 142.4, e^-12 + 11 = 11.0, e^100 (inf in fp32), 0.1065]
    expected = {
        "k1": [-5.0, 10.0, -10.0, 0.5],  # d, capped at -+10
        "k2": [10.0, 10.0, 10.0, 0.125],  # 0.5 d^2 = [12.5, 72, 5000, 0.125]
        "k3": [10.0, 10.0, 10.0, math.exp(-0.5) - 0.5],
        "abs": [5.0, 10.0, 10.0, 0.5],
    }
    for kind, want in expected.items():
        kl = kl_penalty(logp, ref, kind)
        torch.testing.assert_close(kl, torch.tensor(want))
        (grad,) = torch.autograd.grad(kl.sum(), logp)
        assert torch.isfinite(grad).all(), kind
        # a capped token has zero gradient; the uncapped d = 0.5 keeps its own
        capped = kl.detach().abs() == 10.0
        assert torch.equal(grad[capped], torch.zeros(int(capped.sum()))) and grad[3] != 0
    # the old behaviour, uncapped: k3 at d = -5 is e^5 - 6 = 142.41
    torch.testing.assert_close(
        kl_penalty(logp[:1], ref[:1], "k3", cap=None), torch.tensor([math.exp(5.0) - 6.0])
    )


def test_kl_penalty_unknown_kind_names_it():
    with pytest.raises(ValueError, match="k9"):
        kl_penalty(t([0.0]), t([0.0]), "k9")


def test_token_rewards_ragged_no_clip():
    scores = t([2.0, -3.0, 5.0])
    kl = torch.full((3, 4), 0.1, dtype=F64)
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    out = token_rewards(scores, kl, mask, kl_coeff=0.5, clip_min=None, clip_max=None)
    # -0.5 * 0.1 = -0.05 on valid tokens; score on the last valid one; empty row gets nothing
    expected = t(
        [
            [-0.05, -0.05, -0.05 + 2.0, 0.0],
            [-0.05, -0.05 - 3.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(out, expected)


def test_token_rewards_clipping():
    scores = t([2.0, -3.0, 0.5])
    kl = torch.full((3, 3), 0.1, dtype=F64)
    mask = t([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    out = token_rewards(scores, kl, mask, kl_coeff=0.5, clip_min=-1.0, clip_max=1.0)
    # scores clipped to [1, -1, 0.5]
    expected = t([[-0.05, -0.05, 0.95], [-1.05, 0.0, 0.0], [-0.05, 0.45, 0.0]])
    torch.testing.assert_close(out, expected)
    # only an upper bound: -3 stays -3
    out = token_rewards(scores, kl, mask, kl_coeff=0.5, clip_min=None, clip_max=1.0)
    torch.testing.assert_close(out[1, 0], t(-3.05))


def test_token_rewards_kl_coeff_zero_is_score_only():
    scores = t([1.0, 2.0])
    kl = torch.randn(2, 3, dtype=F64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = token_rewards(scores, kl, mask, kl_coeff=0.0, clip_min=None, clip_max=None)
    torch.testing.assert_close(out, t([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]))


def test_token_rewards_does_not_mutate_inputs():
    scores = t([2.0, -3.0])
    kl = torch.full((2, 3), 0.1, dtype=F64)
    mask = t([[1, 1, 0], [1, 1, 1]])
    copies = [x.clone() for x in (scores, kl, mask)]
    token_rewards(scores, kl, mask, 0.5, -1.0, 1.0)
    for x, c in zip((scores, kl, mask), copies):
        assert torch.equal(x, c)


# --------------------------------------------------------------------------- GAE


def gae_reference(rewards, values, lengths, gamma, lam):
    """Plain Python double loop; values past the last valid token are 0."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        L = lengths[b]
        last = 0.0
        for i in reversed(range(L)):
            next_v = values[b][i + 1] if i + 1 < L else 0.0
            delta = rewards[b][i] + gamma * next_v - values[b][i]
            last = delta + gamma * lam * last
            adv[b][i] = last
            ret[b][i] = last + values[b][i]
    return t(adv), t(ret)


def test_gae_by_hand():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.5, 0.5]])
    mask = t([[1, 1, 1]])
    # gamma = lam = 1: A_t = sum_{k >= t} r_k - V_t = 1 - 0.5 = 0.5 everywhere; R = 1
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, t([[0.5, 0.5, 0.5]]))
    torch.testing.assert_close(ret, t([[1.0, 1.0, 1.0]]))
    # gamma = lam = 0.5: delta = [0 + .25 - .5, 0 + .25 - .5, 1 + 0 - .5] = [-.25, -.25, .5]
    # A_2 = .5; A_1 = -.25 + .25 * .5 = -.125; A_0 = -.25 + .25 * -.125 = -.28125
    adv, ret = gae_advantages(rewards, values, mask, 0.5, 0.5)
    torch.testing.assert_close(adv, t([[-0.28125, -0.125, 0.5]]))
    torch.testing.assert_close(ret, t([[0.21875, 0.375, 1.0]]))


@pytest.mark.parametrize(
    "gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (1.0, 0.9), (0.0, 1.0)]
)
def test_gae_matches_loop_reference_on_ragged_masks(gamma, lam):
    g = torch.Generator().manual_seed(5)
    lengths = [7, 1, 4, 0, 6]
    B, T = len(lengths), 7
    mask = ragged_mask(lengths, T)
    # garbage on padding must not leak into valid positions
    rewards = torch.randn(B, T, generator=g, dtype=F64)
    values = torch.randn(B, T, generator=g, dtype=F64)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert torch.equal(adv * (1 - mask), torch.zeros_like(adv))


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(6)
    lengths = [5, 2, 3]
    mask = ragged_mask(lengths, 5)
    rewards = torch.randn(3, 5, generator=g, dtype=F64) * mask
    values = torch.randn(3, 5, generator=g, dtype=F64) * mask
    to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, (to_go - values) * mask)
    torch.testing.assert_close(ret, to_go * mask)


def test_gae_bool_mask_and_float32():
    rewards = torch.tensor([[0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 9.0]])
    mask = torch.tensor([[True, True, False]])
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    # valid length 2: A = [1 - .5, 1 - .5]; padding (the 9s) ignored
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 0.0]]))
    assert adv.dtype == torch.float32


# --------------------------------------------------------------------------- policy / value loss


def test_policy_loss_ratio_one_gives_minus_advantage():
    logp = t([-1.0, -2.0, -0.5])
    adv = t([1.0, -2.0, 0.5])
    loss, clipped = policy_loss(logp, logp.clone(), adv, clip_eps=0.2)
    torch.testing.assert_close(loss, -adv)
    assert torch.equal(clipped, torch.zeros(3, dtype=F64))


def test_policy_loss_clipping_by_hand():
    old = t([0.0, 0.0, 0.0, 0.0])
    # ratios [1.5, 0.5, 0.5, 1.5]
    logp = torch.log(t([1.5, 0.5, 0.5, 1.5]))
    adv = t([2.0, -1.0, 2.0, -1.0])
    loss, clipped = policy_loss(logp, old, adv, clip_eps=0.2)
    # A>0, r=1.5: max(-3, -2 * 1.2 = -2.4) = -2.4, clipped
    # A<0, r=0.5: max(0.5, 1 * 0.8 = 0.8) = 0.8, clipped
    # A>0, r=0.5: max(-1, -2 * 0.8 = -1.6) = -1, not clipped (pessimistic side)
    # A<0, r=1.5: max(1.5, 1.2) = 1.5, not clipped
    torch.testing.assert_close(loss, t([-2.4, 0.8, -1.0, 1.5]))
    assert torch.equal(clipped, t([1.0, 1.0, 0.0, 0.0]))


def test_policy_loss_clip_eps_high():
    logp = torch.log(t([1.25]))
    old = t([0.0])
    adv = t([1.0])
    # symmetric eps 0.2: clip(1.25) = 1.2 -> loss max(-1.25, -1.2) = -1.2, clipped
    loss, clipped = policy_loss(logp, old, adv, clip_eps=0.2)
    torch.testing.assert_close(loss, t([-1.2]))
    assert clipped[0] == 1.0
    # eps_high 0.28: 1.25 < 1.28, not clipped -> -1.25
    loss, clipped = policy_loss(logp, old, adv, clip_eps=0.2, clip_eps_high=0.28)
    torch.testing.assert_close(loss, t([-1.25]))
    assert clipped[0] == 0.0


def test_policy_loss_gradient_zero_on_clipped_tokens():
    ratios = t([1.5, 0.5, 0.5, 1.5, 1.0])
    logp = torch.log(ratios).requires_grad_()
    old = torch.zeros(5, dtype=F64)
    adv = t([2.0, -1.0, 2.0, -1.0, 3.0])
    loss, clipped = policy_loss(logp, old, adv, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    # d(-A r)/d logp = -A r on unclipped tokens, 0 on clipped ones
    expected = torch.where(clipped.bool(), torch.zeros_like(adv), -adv * ratios)
    torch.testing.assert_close(grad, expected)
    assert clipped.sum() == 2 and (grad[~clipped.bool()] != 0).all()


def test_policy_loss_extreme_log_ratio_is_finite():
    # float32, log-ratio logp - old = [100, 25, 25, 1]; A = [-1, -1, 1, -1]
    old = torch.zeros(4)
    logp = torch.tensor([100.0, 25.0, 25.0, 1.0], requires_grad=True)
    adv = torch.tensor([-1.0, -1.0, 1.0, -1.0])
    # unguarded: exp(100) = inf in float32, exp(25) = 7.2e10 -> loss 7.2e10
    raw, _ = policy_loss(logp.detach(), old, adv, clip_eps=0.2, max_log_ratio=None)
    assert torch.isinf(raw[0]) and raw[1] > 7e10
    loss, clipped = policy_loss(logp, old, adv, clip_eps=0.2)
    # clamped at 20: A < 0 -> max(e^20, 1.2) = e^20 = 4.85e8; A > 0 -> max(-e^20, -1.2) = -1.2
    # (clipped); log-ratio 1 is inside the bound: max(e, 1.2) = e
    e20 = math.exp(20.0)
    torch.testing.assert_close(loss, torch.tensor([e20, e20, -1.2, math.e]))
    assert torch.equal(clipped, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert torch.isfinite(grad).all()
    # past the bound the ratio is constant: zero gradient; inside, d(-A r)/d logp = -A r = e
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, 0.0, math.e]))


def test_policy_loss_dual_clip_bounds_negative_advantages():
    old = t([0.0, 0.0, 0.0])
    logp = torch.log(t([4.0, 2.0, 0.5])).requires_grad_()
    neg = t([-1.0, -1.0, -1.0])
    loss, clipped = policy_loss(logp, old, neg, clip_eps=0.2, dual_clip_c=3.0)
    # A = -1: standard loss max(r, clip(r, 0.8, 1.2)) = [4, 2, 0.8], then min(., -A c = 3):
    # r = 4 -> 3 (dual clip); r = 2 -> 2 (neither); r = 0.5 -> 0.8 (standard clip)
    torch.testing.assert_close(loss, t([3.0, 2.0, 0.8]))
    assert torch.equal(clipped, t([1.0, 0.0, 1.0]))
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    # only r = 2 has a gradient: d(-A r)/d logp = r = 2
    torch.testing.assert_close(grad, t([0.0, 2.0, 0.0]))
    # without dual clip, r = 4 gives 4 and is not counted as clipped
    loss, clipped = policy_loss(logp.detach(), old, neg, clip_eps=0.2)
    torch.testing.assert_close(loss, t([4.0, 2.0, 0.8]))
    assert torch.equal(clipped, t([0.0, 0.0, 1.0]))


def test_policy_loss_dual_clip_leaves_non_negative_advantages():
    old = t([0.0, 0.0, 0.0])
    logp = torch.log(t([4.0, 4.0, 0.5]))
    adv = t([2.0, 0.0, 2.0])
    # A = 2: max(-2 r, -2 clip(r)) = [max(-8, -2.4), ., max(-1, -1.6)] = [-2.4, ., -1];
    # A = 0: loss 0, and the bound -A c = 0 is not applied (it is for A < 0 only)
    for c in (None, 3.0):
        loss, clipped = policy_loss(logp, old, adv, clip_eps=0.2, dual_clip_c=c)
        torch.testing.assert_close(loss, t([-2.4, 0.0, -1.0]))
        assert torch.equal(clipped, t([1.0, 0.0, 0.0]))


def test_policy_loss_dual_clip_with_extreme_log_ratio():
    # log-ratio 25 and 100 with A = -2: clamped to 20, then bounded by -A c = 2 * 3 = 6
    old = torch.zeros(2)
    logp = torch.tensor([25.0, 100.0], requires_grad=True)
    loss, clipped = policy_loss(logp, old, torch.tensor([-2.0, -2.0]), 0.2, dual_clip_c=3.0)
    torch.testing.assert_close(loss, torch.tensor([6.0, 6.0]))
    assert torch.equal(clipped, torch.ones(2))
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert torch.equal(grad, torch.zeros(2))


def test_value_loss_clipped_by_hand():
    values = t([1.0, 1.0, 0.0])
    old = t([0.0, 0.9, 1.0])
    returns = t([2.0, 0.0, 0.5])
    loss, clipped = value_loss(values, old, returns, clip_eps=0.2)
    # 0: (1-2)^2 = 1; v_clip = 0 + 0.2 -> (0.2-2)^2 = 3.24 > 1 -> 0.5 * 3.24 = 1.62, clipped
    # 1: (1-0)^2 = 1; v_clip = 0.9 + 0.1 = 1.0 -> 1, equal -> 0.5, not clipped
    # 2: (0-.5)^2 = .25; v_clip = 1 - 0.2 = 0.8 -> .09 < .25 -> 0.125, not clipped
    torch.testing.assert_close(loss, t([1.62, 0.5, 0.125]))
    assert torch.equal(clipped, t([1.0, 0.0, 0.0]))


def test_value_loss_unclipped():
    values = t([1.0, 1.0, 0.0])
    old = t([0.0, 0.9, 1.0])
    returns = t([2.0, 0.0, 0.5])
    loss, clipped = value_loss(values, old, returns, clip_eps=None)
    # 0.5 * (v - R)^2 = [0.5, 0.5, 0.125]
    torch.testing.assert_close(loss, t([0.5, 0.5, 0.125]))
    assert torch.equal(clipped, torch.zeros(3, dtype=F64))


def test_value_loss_gradient_zero_when_clipped():
    values = t([1.0, 0.0]).requires_grad_()
    old = t([0.0, 1.0])
    returns = t([2.0, 0.5])
    loss, clipped = value_loss(values, old, returns, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), values)
    # token 0 clipped -> 0; token 1: d 0.5 (v - R)^2 = v - R = -0.5
    torch.testing.assert_close(grad, t([0.0, -0.5]))
    assert torch.equal(clipped, t([1.0, 0.0]))


# --------------------------------------------------------------------------- reductions


def test_aggregate_and_seq_mean_token_mean_by_hand():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # (1 + 2 + 4) / 3 tokens
    torch.testing.assert_close(aggregate(x, mask, 3.0), t(7.0 / 3.0))
    torch.testing.assert_close(aggregate(x, mask, torch.tensor(3.0, dtype=F64)), t(7.0 / 3.0))
    # row means [1.5, 4] summed / 2 samples
    torch.testing.assert_close(seq_mean_token_mean(x, mask, 2), t(2.75))
    # with a larger batch behind it (4 samples) the same rows weigh half
    torch.testing.assert_close(seq_mean_token_mean(x, mask, 4), t(1.375))


SPLITS = [[8], [4, 4], [2, 2, 2, 2], [1] * 8, [3, 5], [1, 6, 1]]


def batch_data():
    g = torch.Generator().manual_seed(7)
    B, T = 8, 6
    mask = ragged_mask([6, 1, 3, 0, 5, 6, 2, 4], T)
    per_token = torch.randn(B, T, generator=g, dtype=F64)
    return per_token, mask


@pytest.mark.parametrize("sizes", SPLITS)
def test_aggregate_micro_batch_sum_equals_full_batch(sizes):
    per_token, mask = batch_data()
    n_tokens = mask.sum()  # computed once over the whole batch
    full = aggregate(per_token, mask, n_tokens)
    micro = list(zip(per_token.split(sizes), mask.split(sizes)))
    parts = sum(aggregate(p, m, n_tokens) for p, m in micro)
    torch.testing.assert_close(parts, full, rtol=0, atol=1e-12)
    full = seq_mean_token_mean(per_token, mask, 8)
    parts = sum(seq_mean_token_mean(p, m, 8) for p, m in micro)
    torch.testing.assert_close(parts, full, rtol=0, atol=1e-12)


def test_per_micro_batch_normaliser_would_differ():
    # control for the invariance test: normalising each micro-batch by its own count is wrong
    per_token, mask = batch_data()
    full = aggregate(per_token, mask, mask.sum())
    wrong = sum(aggregate(p, m, m.sum()) / 2 for p, m in zip(per_token.split(4), mask.split(4)))
    assert not torch.allclose(wrong, full)


def ppo_step_loss(head, feats, labels, old_logp, adv, mask, n_tokens, num_samples):
    """A tiny PPO loss: token-mean clipped policy loss plus a seq-mean entropy bonus."""
    logits = head(feats)  # (b, T, V)
    logp = logprobs_from_logits(logits, labels)
    pl, _ = policy_loss(logp, old_logp, adv, clip_eps=0.2)
    ent = entropy_from_logits(logits)
    return aggregate(pl, mask, n_tokens) - 0.01 * seq_mean_token_mean(ent, mask, num_samples)


@pytest.mark.parametrize("sizes", SPLITS)
def test_micro_batch_gradient_accumulation_equals_full_batch(sizes):
    g = torch.Generator().manual_seed(8)
    B, T, D, V = 8, 6, 5, 9
    head = torch.nn.Linear(D, V, dtype=F64)
    torch.nn.init.normal_(head.weight, generator=g)
    feats = torch.randn(B, T, D, generator=g, dtype=F64)
    labels = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        # old policy a little off, so some tokens clip
        noise = 0.3 * torch.randn(B, T, generator=g, dtype=F64)
        old_logp = logprobs_from_logits(head(feats), labels) + noise
    adv = torch.randn(B, T, generator=g, dtype=F64)
    _, mask = batch_data()
    n_tokens, num_samples = mask.sum(), B  # once per optimizer step

    head.zero_grad()
    ppo_step_loss(head, feats, labels, old_logp, adv, mask, n_tokens, num_samples).backward()
    full = [p.grad.clone() for p in head.parameters()]

    head.zero_grad()
    chunks = [x.split(sizes) for x in (feats, labels, old_logp, adv, mask)]
    for f, lab, old, a, m in zip(*chunks):
        ppo_step_loss(head, f, lab, old, a, m, n_tokens, num_samples).backward()
    for p, ref in zip(head.parameters(), full):
        assert ref.abs().max() > 0
        torch.testing.assert_close(p.grad, ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- running moments


def test_running_moments_chunks_equal_concatenation():
    g = torch.Generator().manual_seed(9)
    chunks = [torch.randn(n, generator=g) * 3 + 2 for n in (1, 7, 2, 30, 5)]
    chunks.append(torch.randn(2, 3, generator=g))  # any shape
    rm = RunningMoments()
    for c in chunks:
        rm.update(c)
    allv = torch.cat([c.flatten() for c in chunks]).double()
    torch.testing.assert_close(rm.mean, allv.mean())
    torch.testing.assert_close(rm.std, allv.std(unbiased=False))
    assert rm.count == allv.numel()
    assert rm.mean.dtype == F64


def test_running_moments_initial_state_and_empty_update():
    rm = RunningMoments()
    assert rm.count == 0 and rm.mean == 0.0 and rm.std == 1.0
    rm.update(torch.empty(0))
    assert rm.count == 0
    rm.update(torch.tensor([3.0]))
    # one value: mean 3, population std 0
    assert rm.count == 1 and rm.mean == 3.0 and rm.std == 0.0


def test_running_moments_state_dict_round_trip():
    g = torch.Generator().manual_seed(10)
    a = RunningMoments()
    a.update(torch.randn(10, generator=g))
    b = RunningMoments()
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.mean, a.mean) and torch.equal(b.std, a.std)
    assert torch.equal(b.count, a.count)
    more = torch.randn(4, generator=g) + 5
    a.update(more)
    b.update(more)
    assert torch.equal(b.mean, a.mean) and torch.equal(b.std, a.std)
    # state_dict is a snapshot, not a live view
    snap = a.state_dict()
    a.update(torch.ones(3))
    assert snap["count"] == 14


def test_normalize_by_hand():
    x = torch.tensor([1.0, 3.0, 5.0])
    # (x - 3) / 2
    out = normalize(x, torch.tensor(3.0, dtype=F64), torch.tensor(2.0, dtype=F64), eps=0.0)
    torch.testing.assert_close(out, torch.tensor([-1.0, 0.0, 1.0]))
    assert normalize(x, 3.0, 2.0).dtype == torch.float32
    rm = RunningMoments()
    rm.update(x)
    # mean 3, population std sqrt(8/3)
    expected = (x - 3.0) / math.sqrt(8.0 / 3.0)
    torch.testing.assert_close(normalize(x, rm.mean, rm.std, eps=0.0), expected)
