"""PPO options through the pipelined path: critic warm-up, PTX loss, epochs x mini-batches."""

import json

import pytest
import torch

from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def test_critic_warmup_trains_only_the_critic(tmp_path, fresh_engine, initial_policy_weights):
    trainer = RLHFTrainer(
        tiny_config(tmp_path, **{"train_config.critic_warmup_step": 1}),
        engine=fresh_engine,
        console=False,
    )
    critic_before = {k: v.clone() for k, v in trainer.critic.model.state_dict().items()}
    metrics = trainer.train_step()
    actor = trainer.actor.model.state_dict()
    assert all(torch.equal(actor[k], initial_policy_weights[k]) for k in initial_policy_weights)
    assert any(
        not torch.equal(v, trainer.critic.model.state_dict()[k]) for k, v in critic_before.items()
    )
    assert metrics["policy_version"] == 0 and fresh_engine.version == 0
    assert "actor/policy_loss" not in metrics
    metrics = trainer.train_step()  # warm-up over: the actor moves, the version advances
    assert metrics["policy_version"] == 1 and "actor/policy_loss" in metrics
    trainer.close()


def test_ptx_loss_is_added_and_changes_the_update(tmp_path, vllm_engine, initial_policy_weights):
    text = tmp_path / "pretrain.jsonl"
    text.write_text(
        "".join(json.dumps({"text": f"river stone {i} cloud {i * 7}"}) + "\n" for i in range(20))
    )
    ptx = {
        "pretrain_dataset_config": {
            "message_datasets": [str(text)],
            "samples_each_epoch": 4,
            "max_len": 32,
        },
        "train_config.pretrain_loss_weight": 0.5,
    }
    out = {}
    for name, over in (("plain", {}), ("ptx", ptx)):
        vllm_engine.load_weights(initial_policy_weights.items(), version=0)
        trainer = RLHFTrainer(
            tiny_config(tmp_path / name, **over), engine=vllm_engine, console=False
        )
        out[name] = (
            trainer.train_step(),
            {k: v.clone() for k, v in trainer.actor.model.state_dict().items()},
        )
        trainer.close()
    assert out["ptx"][0]["actor/ptx_loss"] > 0
    assert "actor/ptx_loss" not in out["plain"][0]
    assert out["ptx"][0]["reward"] == out["plain"][0]["reward"]  # same samples
    assert any(not torch.equal(out["ptx"][1][k], out["plain"][1][k]) for k in out["ptx"][1])


def test_epochs_and_mini_batches_step_several_times(tmp_path, fresh_engine):
    trainer = RLHFTrainer(
        tiny_config(tmp_path, **{"train_config.ppo_epochs": 2, "train_config.num_mini_batches": 2}),
        engine=fresh_engine,
        console=False,
    )
    metrics = trainer.train_step()
    # 2 epochs x 2 mini-batches = 4 optimizer steps per model in one PPO step.
    assert trainer.actor.scheduler.last_epoch == 4
    assert trainer.critic.scheduler.last_epoch == 4
    # Later updates see a moved policy: the ratio leaves 1 and the approximate KL is positive.
    assert metrics["actor/approx_kl"] > 0
    trainer.close()


def test_evaluation_every_interval_with_eval_sampling(tmp_path, fresh_engine, tiny_assets):
    over = {
        "train_config.eval_interval": 2,
        "rollout_config.eval_temperature": 0.0,
        "eval_dataset_config": {
            "message_datasets": [str(tiny_assets.eval_prompts)],
            "samples_each_epoch": 8,
            "max_len": 48,
        },
    }
    trainer = RLHFTrainer(tiny_config(tmp_path, **over), engine=fresh_engine, console=False)
    history = trainer.learn(4)
    trainer.close()
    assert ["eval/reward" in h for h in history] == [False, True, False, True]
    assert 0.0 <= history[1]["eval/reward"] <= 1.0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert "eval/reward" in logged[1] and "reward" in logged[1]


def test_missing_vllm_settings_warn_by_name():
    from rlhf_pipe.rollout.vllm_engine import unsupported_engine_settings

    dropped = unsupported_engine_settings(
        {"max_paddings": 256, "block_size": 16, "max_num_batched_tokens": 2048}
    )
    assert "max_paddings" in dropped and "block_size" not in dropped


def _nan_for_first(prompts, responses):
    return [float("nan")] + [0.5] * (len(responses) - 1)


def test_nan_reward_stops_the_step_that_made_it(tmp_path, fresh_engine, initial_policy_weights):
    from rlhf_pipe.pipeline.stages import StageError

    trainer = RLHFTrainer(
        tiny_config(tmp_path), engine=fresh_engine, reward_fn=_nan_for_first, console=False
    )
    with pytest.raises(
        StageError,
        match=r"non-finite reward for samples \[[\d, ]+\]; weights "
        r"unchanged",
    ):
        trainer.train_step()
    actor = trainer.actor.model.state_dict()
    assert all(torch.equal(actor[k], initial_policy_weights[k]) for k in initial_policy_weights)
    trainer.close()


def test_nan_update_is_skipped_when_asked(tmp_path, fresh_engine, initial_policy_weights):
    trainer = RLHFTrainer(
        tiny_config(
            tmp_path, **{"train_config.on_nonfinite": "skip", "repeater_config.norm_rewards": False}
        ),
        engine=fresh_engine,
        reward_fn=_nan_for_first,
        console=False,
    )
    metrics = trainer.train_step()
    assert metrics["nonfinite_skipped"] == 1.0
    assert metrics["policy_version"] == 0 and fresh_engine.version == 0
    actor = trainer.actor.model.state_dict()
    assert all(torch.equal(actor[k], initial_policy_weights[k]) for k in initial_policy_weights)
    assert all(p.grad is None for p in trainer.actor.model.parameters())
    trainer.close()


def test_dual_clip_c_reaches_the_policy_loss(tmp_path, fresh_engine, monkeypatch):
    from rlhf_pipe.ppo import core

    seen = []
    real = core.policy_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dual_clip_c"))
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "policy_loss", spy)
    trainer = RLHFTrainer(
        tiny_config(tmp_path, **{"train_config.dual_clip_c": 3.0}),
        engine=fresh_engine,
        console=False,
    )
    metrics = trainer.train_step()
    trainer.close()
    assert seen and set(seen) == {3.0}  # every train chunk used the configured bound
    assert 0.0 <= metrics["actor/clip_frac"] <= 1.0
