"""GRPO / RLOO / REINFORCE++ through the pipelined path, groups straddling micro-batches."""

import pytest
import torch

from rlhf_pipe.ppo.group import grpo_advantages, rloo_advantages
from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import plan_step, tiny_config

pytestmark = pytest.mark.slow

CRITIC_FREE = {
    "model_configs.critic": None,
    "rollout_config.n": 4,
    "prompt_dataset_config.samples_each_epoch": 6,
    "train_config.infer_micro_bs": 2,
    "train_config.train_micro_bs": 2,
}


def _trainer(tmp_path, engine, **over):
    cfg = tiny_config(tmp_path, **{**CRITIC_FREE, **over})
    return RLHFTrainer(cfg, engine=engine, console=False)


@pytest.mark.parametrize("group_std", [None, "unbiased", "population"])
def test_grpo_groups_split_across_micro_batches_match_hand_computation(
    tmp_path, fresh_engine, group_std
):
    # 6 prompts x n=4 = 24 samples in 4 micro-batches of 6: a group of 4 straddles a boundary
    # whenever its answers finish in different micro-batches. group_std None: the default.
    over = {} if group_std is None else {"repeater_config.group_std": group_std}
    trainer = _trainer(
        tmp_path,
        fresh_engine,
        PIPE_MICRO_BATCH_NUM=4,
        **{
            "repeater_config.algorithm": "grpo",
            "repeater_config.kl_coeff": 0.0,
            "repeater_config.norm_rewards": False,
            **over,
        },
    )
    unbiased = group_std != "population"  # the default is the (n - 1) std of verl, TRL, OpenRLHF
    out = trainer.pipeline.run(plan_step(trainer, 0))
    assert out.extra["advantage_waits"] > 0  # some micro-batch waited for a straddling group
    by_prompt = {}
    for s in out.samples:
        by_prompt.setdefault(s.prompt_index, []).append(s)
    assert sorted(by_prompt) == list(range(6)) and all(len(g) == 4 for g in by_prompt.values())
    for members in by_prompt.values():
        members.sort(key=lambda s: s.sample_id)
        scores = torch.stack([s.score for s in members]).clamp(-5, 5)
        expected = grpo_advantages(scores, torch.zeros(4, dtype=torch.long), unbiased=unbiased)
        for s, e in zip(members, expected):
            assert torch.allclose(s.advantages, torch.full_like(s.advantages, e.item()))
            if torch.all(scores == scores[0]):
                assert torch.all(s.advantages == 0)
    trainer.close()


@pytest.mark.parametrize(
    "algorithm,kl_mode,norm",
    [
        ("grpo", "loss", False),
        ("rloo", "reward", False),
        ("reinforce_pp", "reward", False),
        # 'batch' holds the whole batch, then normalises before the group baseline (issue 17)
        ("grpo", "reward", "batch"),
        ("rloo", "loss", "batch"),
    ],
)
def test_critic_free_pipelined_equals_serial(
    tmp_path, vllm_engine, initial_policy_weights, algorithm, kl_mode, norm
):
    weights = {}
    for m in (1, 4):
        vllm_engine.load_weights(initial_policy_weights.items(), version=0)
        trainer = _trainer(
            tmp_path / f"{algorithm}{m}",
            vllm_engine,
            PIPE_MICRO_BATCH_NUM=m,
            **{
                "repeater_config.algorithm": algorithm,
                "repeater_config.kl_mode": kl_mode,
                "repeater_config.norm_rewards": norm,
            },
        )
        history = trainer.learn(2)
        trainer.close()
        assert trainer.critic is None
        if kl_mode == "loss":
            assert "actor/kl_loss" in history[-1]
        weights[m] = {k: v.clone() for k, v in trainer.actor.model.state_dict().items()}
    assert all(torch.equal(weights[1][k], weights[4][k]) for k in weights[1])
    assert any(not torch.equal(weights[1][k], initial_policy_weights[k]) for k in weights[1])


def test_group_batch_norm_normalises_over_the_batch_before_the_baseline(tmp_path, fresh_engine):
    # issue 17: a group algorithm with norm_rewards='batch' once failed with KeyError: 0.
    trainer = _trainer(
        tmp_path,
        fresh_engine,
        PIPE_MICRO_BATCH_NUM=4,
        **{
            "repeater_config.algorithm": "rloo",
            "repeater_config.kl_coeff": 0.0,
            "repeater_config.norm_rewards": "batch",
        },
    )
    out = trainer.pipeline.run(plan_step(trainer, 0))
    trainer.close()
    every = sorted(out.samples, key=lambda s: s.sample_id)
    raw = torch.stack([s.score for s in every]).float().clamp(-5, 5)  # (24,)
    normed = (raw - raw.mean()) / (raw.std(unbiased=False) + 1e-8)
    assert raw.std(unbiased=False) < 0.9  # so the normalisation changes RLOO's scale
    ids = torch.tensor([s.prompt_index for s in every])
    expected = rloo_advantages(normed, ids)  # leave-one-out baseline of the normalised scores
    for s, e in zip(every, expected):
        assert torch.allclose(s.advantages, torch.full_like(s.advantages, e.item()), atol=1e-6)
    assert any(e != 0 for e in expected)
