import subprocess
import sys

import pytest

from rlhf_pipe.config import ConfigError
from rlhf_pipe.validation import from_dict, load_config
from tests.conftest import ROOT, TINY_CONFIG, tiny_config


def test_example_loads_with_derived_sizes(tmp_path):
    cfg = tiny_config(tmp_path)
    assert cfg.pipe_micro_batch_num == 4
    assert cfg.plan.pipe_micro_bs == 16 // 4
    assert cfg.constants["PROMPT_BATCH_SIZE"] == 16
    assert cfg.plan.generator.generator_type == "vllm"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"train_config.lr": 1.0}, "train_config.lr: unknown key"),
        (
            {"train_config.max_train_step": "ten"},
            "train_config.max_train_step: expected int, got 'ten'",
        ),
        (
            {"train_config.max_train_step": 0},
            "train_config.max_train_step: expected a value >= 1, got 0",
        ),
        ({"train_config.ppo_epochs": True}, "train_config.ppo_epochs: expected int, got True"),
        (
            {"repeater_config.norm_rewards": "whole"},
            "repeater_config.norm_rewards: expected 'running' or 'batch' or bool, got 'whole'",
        ),
        (
            {"PIPE_MICRO_BATCH_NUM": 3},
            "PIPE_MICRO_BATCH_NUM: samples per step (16 prompts x n=1 = 16) must be divisible by PIPE_MICRO_BATCH_NUM=3",
        ),
        (
            {"train_config.train_micro_bs": 3},
            "train_config.train_micro_bs: must divide pipe_micro_bs=4",
        ),
        (
            {"model_configs.critic.model_path": "/nonexistent/critic"},
            "model_configs.critic.model_path: no such folder: /nonexistent/critic",
        ),
        ({"rollout_config.top_p": 0.0}, "rollout_config.top_p: expected a value > 0.0, got 0.0"),
        ({"rollout_confg": {}}, "rollout_confg: unknown key"),
        (
            {"model_configs.reward.reward_fn": "no_colon"},
            "model_configs.reward.reward_fn: expected 'module:function'",
        ),
        (
            {"train_config.stream_data_loader_type": "stream"},
            "train_config.stream_data_loader_type: expected 'fixed' or 'dynamic', got 'stream'",
        ),
        (
            {"train_config.max_relay_episode": -2},
            "train_config.max_relay_episode: expected a value >= -1, got -2",
        ),
        (
            {"train_config.relay_episode_offset": -1},
            "train_config.relay_episode_offset: expected a value >= 0, got -1",
        ),
        (
            {"train_config.max_relay_episode": 1, "train_config.relay_sample_fn": "no_colon"},
            "train_config.relay_sample_fn: expected 'module:function', got 'no_colon'",
        ),
        (
            {"train_config.relay_sample_fn": "m:f"},
            "train_config.relay_sample_fn: set, but max_relay_episode is 0 (relay off)",
        ),
        (
            {"model_configs.policy.generator_config.batch_generation.min_prompt_length": 49},
            "model_configs.policy.generator_config.batch_generation.min_prompt_length: exceeds prompt_dataset_config.max_len=48",
        ),
        (
            {"model_configs.policy.generator_config.batch_generation.rank": True},
            "model_configs.policy.generator_config.batch_generation.rank: unknown key (known: min_prompt_length, ranking)",
        ),
        (
            {"train_config.dual_clip_c": 1.0},
            "train_config.dual_clip_c: expected a value > 1.0, got 1.0",
        ),
        (
            {"repeater_config.group_std": "sample"},
            "repeater_config.group_std: expected 'unbiased' or 'population', got 'sample'",
        ),
        (
            {"repeater_config.advantage_whiten": True},
            "repeater_config.advantage_whiten: expected False or 'batch' or 'micro_batch', got True",
        ),
        (
            {
                "model_configs.critic": None,
                "rollout_config.n": 2,
                "repeater_config.algorithm": "grpo",
                "repeater_config.advantage_whiten": "batch",
            },
            "repeater_config.advantage_whiten: applies to algorithm 'ppo' (GAE); 'grpo' normalises",
        ),
        (
            {
                "repeater_config.norm_rewards": "batch",
                "repeater_config.advantage_whiten": "micro_batch",
            },
            "repeater_config.advantage_whiten: 'micro_batch' with norm_rewards='batch' would whiten",
        ),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, **override)
    text = str(err.value)
    assert text.startswith(str(TINY_CONFIG) + ": ")
    assert message in text
    assert "\n" not in text


def test_missing_sections_and_files(tmp_path):
    with pytest.raises(ConfigError, match="model_configs: required section is missing"):
        from_dict({"prompt_dataset_config": {}}, "x.py")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = (\n")
    with pytest.raises(ConfigError, match=r"bad.py:1: syntax error"):
        load_config(bad)


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "typo.py"
    cfg.write_text(TINY_CONFIG.read_text().replace("kl_coeff=0.01", "kl_coef=0.01"))
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_pipe", "train", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: {cfg}: repeater_config.kl_coef: unknown key (known: advantage_whiten, "
        "algorithm, clip_reward_max, clip_reward_min, gae_lambda, gamma, group_std, kl_coeff, "
        "kl_estimator, kl_mode, norm_rewards)"
    ]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "value, extra, message",
    [
        ([4, 2], {"rollout_config.ignore_eos": True}, "1 <= lo <= hi"),
        ([1, 10**6], {"rollout_config.ignore_eos": True}, "hi <= max_new_tokens"),
        ([1, 4], {"rollout_config.ignore_eos": False}, "needs rollout_config.ignore_eos"),
    ],
)
def test_response_length_range_is_checked(tmp_path, value, extra, message):
    from rlhf_pipe.config import ConfigError

    with pytest.raises(ConfigError, match="rollout_config.response_length_range") as e:
        tiny_config(tmp_path, **{"rollout_config.response_length_range": value, **extra})
    assert message in str(e.value)


def test_relay_example_loads_with_its_data_features(tmp_path):
    from rlhf_pipe.trainer import resolve_function

    cfg = load_config(ROOT / "examples" / "rlhf" / "tiny_relay_cpu.py")
    t, bg = cfg.train_config, cfg.model_configs.policy.generator_config.batch_generation
    assert (t.stream_data_loader_type, t.max_relay_episode, t.relay_episode_offset) == (
        "dynamic",
        2,
        1,
    )
    assert bg.ranking and bg.min_prompt_length == 10
    assert callable(resolve_function(t.relay_sample_fn))


@pytest.mark.parametrize(
    "key",
    [
        "repeater_config.kl_coeff",
        "train_config.stage_timeout_s",
        "model_configs.policy.trainer_config.max_grad_norm",
        "rollout_config.request_timeout_s",
    ],
)
def test_inf_is_refused_even_where_only_a_lower_bound_is_set(tmp_path, key):
    with pytest.raises(
        ConfigError, match=f"{key.split('.')[-1]}: expected a finite number, got inf"
    ):
        tiny_config(tmp_path, **{key: float("inf")})
