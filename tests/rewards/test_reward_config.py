"""Config of the reward scorers and of the three sampling settings: good shapes load, bad ones
are one line naming the file and key, and a URL's credentials never reach the message."""

from __future__ import annotations

import pytest

from rlhf_pipe.config import ConfigError, RewardScorerConfig
from rlhf_pipe.trainer import sampling_settings
from tests.conftest import TINY_CONFIG, tiny_config

SECRET = "tok-9f8e7d"


def _scorers(tiny_assets, **extra):
    return {
        "model_configs.reward": {
            "scorers": {
                "rm": {"model_path": str(tiny_assets.reward), "weight": 0.5},
                "remote": {"url": "http://127.0.0.1:9/score", "weight": 2.0, "batch_size": 4},
                "digits": {"reward_fn": "rlhf_pipe.assets.tiny:digit_reward"},
                **extra,
            }
        }
    }


def test_scorers_load_in_order_with_weights(tmp_path, tiny_assets):
    cfg = tiny_config(tmp_path, **_scorers(tiny_assets))
    got = cfg.plan.reward_scorers
    assert list(got) == ["rm", "remote", "digits"]
    assert [s.weight for s in got.values()] == [0.5, 2.0, 1.0]
    assert got["remote"].batch_size == 4 and isinstance(got["rm"], RewardScorerConfig)


def test_single_model_and_function_keep_their_meaning(tmp_path, tiny_assets):
    cfg = tiny_config(tmp_path, **{"model_configs.reward.model_path": str(tiny_assets.reward)})
    got = cfg.plan.reward_scorers
    assert list(got) == ["model", "reward_fn"]
    assert got["model"].model_path == str(tiny_assets.reward) and got["model"].weight == 1.0
    assert got["reward_fn"].reward_fn == "rlhf_pipe.assets.tiny:digit_reward"


@pytest.mark.parametrize(
    "scorer, key, message",
    [
        (
            {"weight": 1.0},
            "scorers.bad",
            "expected exactly one of model_path, url, reward_fn, got none",
        ),
        (
            {"url": "http://h/s", "reward_fn": "a:b"},
            "scorers.bad",
            "expected exactly one of model_path, url, reward_fn, got url, reward_fn",
        ),
        (
            {"reward_fn": "nocolon"},
            "scorers.bad.reward_fn",
            "expected 'module:function', got 'nocolon'",
        ),
        ({"reward_fn": "a:b", "timeout_s": 3}, "scorers.bad.timeout_s", "only for a url scorer"),
        (
            {"url": "http://h/s", "weight": float("nan")},
            "scorers.bad.weight",
            "expected a value >= ",
        ),
        (
            {"url": "http://h/s", "batch_size": 0},
            "scorers.bad.batch_size",
            "expected a value >= 1, got 0",
        ),
        (
            {"url": "http://h/s", "token_env": "RLHF_PIPE_TEST_UNSET_VAR"},
            "scorers.bad.token_env",
            "environment variable RLHF_PIPE_TEST_UNSET_VAR is not set",
        ),
        (
            {"url": f"ftp://bob:{SECRET}@h/s"},
            "scorers.bad.url",
            "expected an http:// or https:// URL with a host, got ftp://***@h/s",
        ),
        (
            {"url": f"http://bob:{SECRET}@h:notaport/s"},
            "scorers.bad.url",
            "not a valid URL: http://***@h:notaport/s",
        ),
        (
            {"url": f"http://bob:{SECRET}@h/s", "token_env": "HOME"},
            "scorers.bad.url",
            "credentials in the URL and token_env both given; use one",
        ),
        (
            {"model_path": "/nonexistent/rm"},
            "scorers.bad.model_path",
            "no such folder: /nonexistent/rm",
        ),
        (
            {"url": "http://h/s", "colour": 1},
            "scorers.bad.colour",
            "unknown key (known: backoff_s,",
        ),
    ],
)
def test_bad_scorer_is_one_line(tmp_path, scorer, key, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, **{"model_configs.reward": {"scorers": {"bad": scorer}}})
    text = str(err.value)
    assert text.startswith(f"{TINY_CONFIG}: model_configs.reward.{key}: {message}"), text
    assert "\n" not in text and SECRET not in text


def test_scorers_beside_model_path_and_bad_names(tmp_path):
    with pytest.raises(ConfigError, match="model_configs.reward.scorers: give every scorer here"):
        tiny_config(tmp_path, **{"model_configs.reward.scorers": {"x": {"reward_fn": "a:b"}}})
    with pytest.raises(ConfigError, match=r"model_configs.reward.scorers.'a b': a scorer name"):
        tiny_config(
            tmp_path, **{"model_configs.reward": {"scorers": {"a b": {"reward_fn": "a:b"}}}}
        )
    with pytest.raises(ConfigError, match="model_configs.reward.scorers: expected at least one"):
        tiny_config(tmp_path, **{"model_configs.reward": {"scorers": {}}})


@pytest.mark.parametrize(
    "override, key, message",
    [
        (
            {"use_beam_search": True, "stop_token_list": "x"},
            "rollout_config.use_beam_search",
            "vLLM's beam search takes no stop strings",
        ),
        (
            {"use_beam_search": True, "prompt_logprobs": 1},
            "rollout_config.use_beam_search",
            "vLLM's beam search returns no prompt log-probs",
        ),
        (
            {"use_beam_search": True, "beam_width": 1, "n": 2},
            "rollout_config.beam_width",
            "must be >= n=2",
        ),
        ({"beam_width": 2}, "rollout_config.beam_width", "set, but use_beam_search is False"),
        (
            {"new_token_limit": False, "max_model_len": None},
            "rollout_config.new_token_limit",
            "False lets answers fill the sequence up to max_model_len",
        ),
        (
            {"new_token_limit": False, "max_model_len": 40},
            "prompt_dataset_config.max_len",
            "must be below rollout_config.max_model_len=40 with new_token_limit=False",
        ),
        (
            {"prompt_logprobs": -1},
            "rollout_config.prompt_logprobs",
            "expected a value >= 0, got -1",
        ),
    ],
)
def test_bad_sampling_settings(tmp_path, override, key, message):
    over = {f"rollout_config.{k}": v for k, v in override.items()}
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, **over)
    assert str(err.value).startswith(f"{TINY_CONFIG}: {key}: {message}"), str(err.value)


def test_hf_generator_refuses_beam_search(tmp_path):
    with pytest.raises(ConfigError, match="rollout_config.use_beam_search: needs the vllm"):
        tiny_config(
            tmp_path,
            **{
                "rollout_config.use_beam_search": True,
                "model_configs.policy.generator_config.generator_type": "hf",
            },
        )


def test_sampling_settings_reach_the_engine_request(tmp_path):
    cfg = tiny_config(
        tmp_path,
        **{
            "rollout_config.use_beam_search": True,
            "rollout_config.beam_width": 3,
            "rollout_config.new_token_limit": False,
        },
    )
    s = sampling_settings(cfg.rollout_config)
    assert s.use_beam_search and s.beam_width == 3
    assert s.max_seq_len == cfg.rollout_config.max_model_len == 64
    assert s.max_tokens(10) == 54  # ChatLearn's seq_length - prompt length
    default = sampling_settings(
        tiny_config(tmp_path, **{"rollout_config.prompt_logprobs": 2}).rollout_config
    )
    assert default.max_tokens(10) == 12 and default.prompt_logprobs == 2  # max_new_tokens


def test_two_scorer_example_loads(tmp_path, monkeypatch):
    from rlhf_pipe.validation import load_config
    from tests.conftest import ROOT

    path = ROOT / "examples" / "rlhf" / "tiny_two_scorers_cpu.py"
    monkeypatch.delenv("RLHF_PIPE_REWARD_URL", raising=False)
    assert list(load_config(path).plan.reward_scorers) == ["digits", "rm"]
    monkeypatch.setenv("RLHF_PIPE_REWARD_URL", f"https://bob:{SECRET}@rm.example/score")
    got = load_config(path).plan.reward_scorers
    assert list(got) == ["digits", "rm", "remote"] and got["remote"].token_env is None


def test_credentials_never_reach_a_config_error_or_repr(tmp_path):
    url = f"https://bob:{SECRET}@rm.example/score?key={SECRET}"
    with pytest.raises(ConfigError) as err:  # a list where a dict belongs: its repr is quoted
        tiny_config(tmp_path, **{"model_configs.reward": {"scorers": [{"url": url}]}})
    assert "https://***@rm.example/score?key=***" in str(err.value)
    assert SECRET not in str(err.value)
    assert SECRET not in repr(RewardScorerConfig(url=url))
