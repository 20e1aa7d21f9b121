"""builders: which roles, scorers and engine a config builds (tiny models, no vLLM)."""

import pytest
import torch

from rlhf_pipe.builders import (
    build_engine,
    build_eval_source,
    build_roles,
    build_scorers,
    build_text_prompt_source,
    build_tokenizer,
    pick_device,
    resolve_function,
)
from rlhf_pipe.config import ConfigError
from rlhf_pipe.protocols import MODEL_ROLES, Role
from rlhf_pipe.roles import CriticRole, PolicyRole, ReferenceRole, RewardRole
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def test_every_model_role_of_the_tiny_config(tmp_path):
    cfg = tiny_config(tmp_path)
    roles = build_roles(cfg, MODEL_ROLES, 0, CPU)
    assert {k: type(v) for k, v in roles.items()} == {
        Role.ACTOR: PolicyRole,
        Role.CRITIC: CriticRole,
        Role.REFERENCE: ReferenceRole,
        Role.REWARD: RewardRole,
    }
    scorers = build_scorers(cfg.model_configs.reward, cfg.plan.reward_scorers, CPU)
    assert list(roles[Role.REWARD].names) == [sc.name for sc in scorers]


def test_only_the_asked_roles_and_none_the_config_lacks(tmp_path):
    cfg = tiny_config(
        tmp_path,
        **{
            "model_configs.critic": None,
            "model_configs.reference": None,
            "repeater_config.algorithm": "grpo",
            "repeater_config.kl_coeff": 0.0,
            "rollout_config.n": 2,
        },
    )
    assert set(build_roles(cfg, MODEL_ROLES, 0, CPU)) == {Role.ACTOR, Role.REWARD}
    assert set(build_roles(cfg, [Role.REWARD], 0, CPU)) == {Role.REWARD}


def test_reward_fn_argument_replaces_the_configured_function(tmp_path):
    cfg = tiny_config(tmp_path)
    reward = build_roles(cfg, [Role.REWARD], 0, CPU, reward_fn=lambda p, r: [7.0] * len(r))[
        Role.REWARD
    ]
    [scorer] = build_scorers(cfg.model_configs.reward, cfg.plan.reward_scorers, CPU)
    assert scorer.kind == "function" and scorer.weight == 1.0
    assert reward is not None


def test_hf_generator_builds_a_copy_beside_the_actor(tmp_path):
    from rlhf_pipe.rollout.hf_engine import HFEngine

    cfg = tiny_config(tmp_path, **{"model_configs.policy.generator_config.generator_type": "hf"})
    tok = build_tokenizer(cfg)
    actor = build_roles(cfg, [Role.ACTOR], tok.pad_token_id, CPU)[Role.ACTOR]
    engine = build_engine(cfg, actor, tok)
    assert isinstance(engine, HFEngine)
    assert engine.model is not actor.model  # a copy: the engine loads synced weights into it


def test_small_builders(tmp_path):
    cfg = tiny_config(tmp_path)
    tok = build_tokenizer(cfg)
    assert build_eval_source(cfg, tok) is None  # no eval_dataset_config
    source = build_text_prompt_source(["a =>", "b =>"], cfg.prompt_dataset_config, tok, 0)
    assert sorted(p.text for p in source.next_batch(2)) == ["a =>", "b =>"]
    with pytest.raises(ValueError, match="set_prompts: the list is empty"):
        build_text_prompt_source([], cfg.prompt_dataset_config, tok, 0)
    assert pick_device("cpu") == CPU
    assert resolve_function("rlhf_pipe.assets.tiny:digit_reward").__name__ == "digit_reward"
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        resolve_function("rlhf_pipe.assets.tiny:nope")
