"""The reward role with several weighted scorers (a real tiny reward model, a real local HTTP
reward server, a rule function): the total is the weighted sum, each part is that scorer's own
score, and clipping and the three norm_rewards modes act on the total."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipe.assets.tiny import digit_reward
from rlhf_pipe.models import load_tokenizer, load_value_model, sequence_scores
from rlhf_pipe.pipeline.batch import Sample, collate
from rlhf_pipe.pipeline.stages import AdvantageSettings, StepPipeline
from rlhf_pipe.rewards.http import HTTPRewardModel
from rlhf_pipe.roles import RewardRole, Scorer
from tests.rewards.reward_server import RewardServer

RESPONSES = ["12 34", "abc", "7a", "x9y9", "55", "no"]


@pytest.fixture(scope="module")
def parts(tiny_assets):
    tok = load_tokenizer(str(tiny_assets.policy))
    samples = []
    for i, text in enumerate(RESPONSES):
        prompt = tok(f"question {i}", add_special_tokens=False)["input_ids"]
        answer = tok(text, add_special_tokens=False)["input_ids"]
        samples.append(
            Sample(i, i, 0, torch.tensor(prompt), torch.tensor(answer), f"question {i}", text)
        )
    return tok, samples, load_value_model(str(tiny_assets.reward), "float32", False, "reward")


def test_total_is_the_weighted_sum_of_real_scorers(parts):
    tok, samples, rm = parts
    with RewardServer() as srv:
        role = RewardRole(
            [
                Scorer("rm", 0.5, "model", rm),
                Scorer("remote", 2.0, "remote", HTTPRewardModel("remote", srv.url(), batch_size=4)),
                Scorer("digits", -1.0, "function", lambda p, r: [len(x) for x in r]),
            ],
            tok.pad_token_id,
            infer_micro_bs=2,
        )
        out = torch.stack(role.scores(samples))  # (b, 1 + 3)
    assert out.shape == (6, 4) and role.names == ["rm", "remote", "digits"]
    model_scores = sequence_scores(rm, collate(samples, tok.pad_token_id))
    torch.testing.assert_close(out[:, 1], model_scores)  # chunks of 2 == one batch of 6
    assert out[:, 2].tolist() == pytest.approx(digit_reward([], RESPONSES))
    assert out[:, 3].tolist() == [float(len(r)) for r in RESPONSES]
    torch.testing.assert_close(out[:, 0], 0.5 * out[:, 1] + 2.0 * out[:, 2] - out[:, 3])
    assert [len(s["body"]["responses"]) for s in srv.seen] == [4, 2]  # batch_size 4


def test_set_function_replaces_only_rule_scorers(parts):
    tok, samples, rm = parts
    role = RewardRole(
        [Scorer("rm", 1.0, "model", rm), Scorer("old", 1.0, "function", None)], tok.pad_token_id, 2
    )
    role.set_function(lambda p, r: [1.0] * len(r))
    assert role.names == ["rm", "reward_fn"]
    out = torch.stack(role.scores(samples))
    torch.testing.assert_close(out[:, 0], out[:, 1] + 1.0)


def test_wrong_length_names_the_scorer(parts):
    tok, samples, _ = parts
    role = RewardRole([Scorer("short", 1.0, "function", lambda p, r: [0.0])], tok.pad_token_id, 2)
    with pytest.raises(ValueError, match="reward scorer 'short' returned 1 scores for 6 samples"):
        role.scores(samples)


@pytest.mark.parametrize("norm", [False, "batch", "running"])
def test_clipping_and_normalisation_apply_to_the_total(parts, norm):
    tok, samples, _ = parts
    # Two scorers whose total leaves the clip range [-1, 1] for some samples.
    role = RewardRole(
        [
            Scorer("a", 3.0, "function", lambda p, r: digit_reward(p, r)),
            Scorer("b", -0.5, "function", lambda p, r: [len(x) for x in r]),
        ],
        tok.pad_token_id,
        2,
    )
    for s, value in zip(samples, role.scores(samples)):
        s.score, s.score_parts = value[0], value[1:]
        s.old_logp = torch.zeros(s.num_actions)
        s.values = torch.zeros(s.num_actions)
    total = torch.tensor(
        [3.0 * d - 0.5 * len(r) for d, r in zip(digit_reward([], RESPONSES), RESPONSES)]
    )
    clipped = total.clamp(-1.0, 1.0)
    assert not torch.equal(clipped, total)  # the case really clips
    expected = (
        clipped if norm is False else (clipped - clipped.mean()) / clipped.std(unbiased=False)
    )
    pipe = StepPipeline(None, None, None, None, role, tok, tok.pad_token_id)
    try:
        pipe._advantages(samples, AdvantageSettings(0.0, "k1", 1.0, 1.0, -1.0, 1.0, norm), {})
    finally:
        pipe.close()
    # kl_coeff 0: the only token reward is the (clipped, normalised) total on the last token.
    last = torch.stack([s.token_rewards[-1] for s in samples])
    torch.testing.assert_close(last, expected, atol=1e-5, rtol=1e-5)
