"""assets/tiny.py: the tiny task's reward and relay function (the assets themselves are built
once per session by tests/conftest.py)."""

from types import SimpleNamespace

from rlhf_pipe.assets.tiny import digit_reward, replay_best_answers


def test_digit_reward_is_the_share_of_digits_ignoring_spaces():
    assert digit_reward(["p"] * 4, ["12 34", "1a", "", "ab"]) == [1.0, 0.5, 0.0, 0.0]


def test_replay_takes_the_four_best_older_first_on_ties():
    def d(score, episode, sample):
        return {"score": score, "episode_id": episode, "sample_id": sample}

    episodes = [
        SimpleNamespace(buffer=[d(0.5, 0, 0), d(0.9, 0, 1), d(0.1, 0, 2)]),
        SimpleNamespace(buffer=[d(0.9, 1, 0), d(0.5, 1, 1), d(0.7, 1, 2)]),
    ]
    best = replay_best_answers(episodes)
    assert [(x["episode_id"], x["sample_id"]) for x in best] == [(0, 1), (1, 0), (1, 2), (0, 0)]


def test_built_assets_have_a_policy_and_prompts(tiny_assets):
    assert (tiny_assets.policy / "config.json").exists()
