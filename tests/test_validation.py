"""rlhf_pipe.validation: the checks return the derived RunPlan and leave the config as loaded.
The one-line messages of every check are in tests/test_config.py and tests/test_bad_input.py."""

import pytest

from rlhf_pipe.config import ConfigError
from rlhf_pipe.validation import load_config
from tests.conftest import TINY_CONFIG, tiny_config


def test_validate_returns_the_plan_and_leaves_the_config_as_loaded(tmp_path):
    import copy

    from rlhf_pipe.config import LoraSettings
    from rlhf_pipe.validation import validate

    lora = {
        "model_configs.policy.trainer_config.enable_lora": True,
        "model_configs.policy.trainer_config.lora_dim": 4,
        "model_configs.critic.trainer_config.enable_lora": True,
        "model_configs.policy.generator_config": None,
    }
    cfg = tiny_config(tmp_path, **lora)
    before = copy.deepcopy(cfg)
    plan = validate(cfg)
    assert cfg == before
    assert plan == cfg.plan
    # The derived values are in the plan, not written into the config.
    assert cfg.train_config.pipe_micro_bs is None and plan.pipe_micro_bs == 4
    assert cfg.model_configs.policy.generator_config is None
    assert plan.generator.generator_type == "vllm"
    assert cfg.model_configs.critic.trainer_config.lora_dim is None
    assert plan.lora == {
        "policy": LoraSettings(4, 4.0, 0.0, "ColumnParallelLinear,LinearLayer,RowParallelLinear"),
        "critic": LoraSettings(8, 8.0, 0.0, "ColumnParallelLinear,LinearLayer,RowParallelLinear"),
    }
    assert plan.lora_sync == "merged" and list(plan.reward_scorers) == ["reward_fn"]


def test_path_checks_are_a_parameter(tmp_path):
    missing = {"model_configs.policy.model_path": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match="model_configs.policy.model_path: no such folder"):
        load_config(TINY_CONFIG, missing)
    assert load_config(TINY_CONFIG, missing, check_paths=False).plan.pipe_micro_bs >= 1


def test_unseeded_requests_with_the_hf_generator_are_refused_naming_the_key(tmp_path):
    with pytest.raises(
        ConfigError, match="rollout_config.request_seeds: False applies to the vllm"
    ):
        tiny_config(
            tmp_path,
            **{
                "rollout_config.request_seeds": False,
                "model_configs.policy.generator_config.generator_type": "hf",
            },
        )
