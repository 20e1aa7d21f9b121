"""The behaviour-policy correction (issue 14 item 2): core.behaviour_weights on 3-element
tensors, and PolicyRole.train with it (with and without the Forward stage's old log-probs)."""

import math

import pytest
import torch

from rlhf_pipe.ppo import core

LN2 = math.log(2.0)


def test_tis_truncates_at_the_cap():
    # prox - behaviour = [0, ln 2, 2 ln 2]  ->  w_raw = [1, 2, 4]; cap 3 truncates the 4.
    prox = torch.tensor([[-1.0, -1.0 + LN2, -1.0 + 2 * LN2]])
    beh = torch.tensor([[-1.0, -1.0, -1.0]])
    w, over = core.behaviour_weights(prox, beh, cap=3.0, mode="tis")
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 3.0]]))
    assert over.tolist() == [[0.0, 0.0, 1.0]]


def test_decoupled_drops_tokens_above_the_cap():
    # w_raw = [1, 2, 4] as above; AReaL's behav_imp_weight_cap: 4 > 3 -> weight 0.
    prox = torch.tensor([[-1.0, -1.0 + LN2, -1.0 + 2 * LN2]])
    beh = torch.tensor([[-1.0, -1.0, -1.0]])
    w, over = core.behaviour_weights(prox, beh, cap=3.0, mode="decoupled")
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 0.0]]))
    assert over.tolist() == [[0.0, 0.0, 1.0]]


def test_weights_below_one_and_no_gradient():
    # prox - behaviour = [-ln 2, -ln 4, 0] -> [0.5, 0.25, 1], never truncated from below.
    prox = torch.tensor([[-LN2, -2 * LN2, 0.0]], requires_grad=True)
    beh = torch.zeros(1, 3)
    for mode in ("tis", "decoupled"):
        w, over = core.behaviour_weights(prox, beh, cap=2.0, mode=mode)
        torch.testing.assert_close(w, torch.tensor([[0.5, 0.25, 1.0]]))
        assert not w.requires_grad and over.sum() == 0


def test_huge_log_ratio_stays_finite():
    # 100 nats apart: exp would be inf; the log-ratio is clamped at 20 first.
    w, over = core.behaviour_weights(
        torch.tensor([[0.0, 0.0, -100.0]]), torch.tensor([[-100.0, 0.0, 0.0]]), 2.0, "tis"
    )
    assert torch.isfinite(w).all() and w.tolist()[0] == pytest.approx([2.0, 1.0, math.exp(-20)])
    assert over.tolist() == [[1.0, 0.0, 0.0]]


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'tis' or 'decoupled'"):
        core.behaviour_weights(torch.zeros(1, 3), torch.zeros(1, 3), 2.0, "is")


# ----------------------------------------------------------------------------- PolicyRole.train


def _role(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_pipe.roles import PolicyRole

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(cfg).float()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, warmup_steps=0)
    return PolicyRole(model, 0, **kw, max_grad_norm=1.0, infer_micro_bs=2, train_micro_bs=2)


def _samples(role, behaviour_shift: float | None, with_old: bool):
    """3 samples; behaviour log-probs = the trainer's own + shift (None: no behaviour)."""
    from rlhf_pipe.pipeline.batch import Sample

    g = torch.Generator().manual_seed(1)
    out = []
    for i, r in enumerate((3, 2, 4)):
        out.append(
            Sample(
                i,
                i,
                0,
                torch.randint(1, 32, (3,), generator=g),
                torch.randint(1, 32, (r,), generator=g),
                advantages=torch.randn(r, generator=g),
            )
        )
    own = role.logprobs(out)
    for s, lp in zip(out, own):
        s.old_logp = lp if with_old else None
        if behaviour_shift is not None:
            s.behaviour_logp = lp - behaviour_shift
    return out


def _train(mode, shift, with_old, cap=3.0):
    from rlhf_pipe.roles import LossSettings

    role = _role()
    samples = _samples(role, shift, with_old)
    loss = LossSettings(
        0.2, None, 1.0, 1.0, "token_mean", behaviour_correction=mode, behaviour_is_cap=cap
    )
    sums = role.train(samples, loss, len(samples))
    grads = [p.grad.clone() for p in role.model.parameters() if p.grad is not None]
    return sums, grads


@pytest.mark.parametrize("with_old", [True, False])  # False: skip_redundant_actor_forward
def test_weight_scales_the_policy_gradient(with_old):
    # behaviour = trainer - ln 2 -> w_raw = 2 on every token: 'tis' (cap 3) doubles the policy
    # gradient; cap 1.5 truncates to 1.5; 'decoupled' with cap 1.5 drops every token.
    _, base = _train(None, LN2, with_old)
    sums, tis = _train("tis", LN2, with_old)
    for a, b in zip(tis, base):
        torch.testing.assert_close(a, 2 * b, rtol=1e-4, atol=1e-7)
    n = sums["behaviour_tokens"]
    assert n == 9 and sums["tokens"] == 9
    assert float(sums["behaviour_is_weight"] / n) == pytest.approx(2.0, rel=1e-5)
    assert float(sums["behaviour_truncated"]) == 0
    assert float(sums["behaviour_logp_diff"] / n) == pytest.approx(LN2, rel=1e-5)
    assert float(sums["behaviour_logp_abs_diff"] / n) == pytest.approx(LN2, rel=1e-5)
    assert {k for k in sums if k.startswith("behaviour_chunk_max/")} == {
        "behaviour_chunk_max/0",
        "behaviour_chunk_max/2",
    }
    sums, capped = _train("tis", LN2, with_old, cap=1.5)
    for a, b in zip(capped, base):
        torch.testing.assert_close(a, 1.5 * b, rtol=1e-4, atol=1e-7)
    assert float(sums["behaviour_truncated"]) == 9
    sums, dropped = _train("decoupled", LN2, with_old, cap=1.5)
    assert all(g.abs().max() == 0 for g in dropped) and float(sums["behaviour_is_weight"]) == 0


def test_none_is_bit_exact_and_missing_behaviour_weighs_one():
    _, plain = _train(None, None, True)
    _, none_with_behaviour = _train(None, LN2, True)
    _, tis_without_behaviour = _train("tis", None, True)  # hf engine, replayed samples
    for a, b, c in zip(plain, none_with_behaviour, tis_without_behaviour):
        assert torch.equal(a, b) and torch.equal(a, c)
