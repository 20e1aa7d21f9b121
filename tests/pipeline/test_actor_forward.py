"""The Forward stage skips the actor when its log-probs are redundant (one update per batch,
no KL in the reward): Train's own log-probs stand for them. The update equals the one with the
extra forward up to float rounding, and pipelined still equals serial exactly."""

import pytest
import torch

from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import plan_step, tiny_config

pytestmark = pytest.mark.slow

KL_IN_LOSS = {"repeater_config.kl_mode": "loss"}


def _run(tmp_path, engine, initial, steps=2, **over):
    engine.load_weights(initial.items(), version=0)
    trainer = RLHFTrainer(tiny_config(tmp_path, **over), engine=engine, console=False)
    history = [trainer.train_step() for _ in range(steps)]
    weights = {
        part: {k: v.clone() for k, v in role.model.state_dict().items()}
        for part, role in (("actor", trainer.actor), ("critic", trainer.critic))
    }
    plan = plan_step(trainer)
    trainer.close()
    return weights, history, plan


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_when_the_actor_forward_is_needed(tmp_path, fresh_engine):
    cases = [
        ({}, True),  # KL in the reward (the default)
        ({"repeater_config.kl_coeff": 0.0}, False),
        (KL_IN_LOSS, False),
        ({**KL_IN_LOSS, "train_config.ppo_epochs": 2}, True),  # later epochs need old
        ({**KL_IN_LOSS, "train_config.num_mini_batches": 2}, True),
        ({**KL_IN_LOSS, "train_config.skip_redundant_actor_forward": False}, True),
    ]
    for i, (over, needed) in enumerate(cases):
        trainer = RLHFTrainer(
            tiny_config(tmp_path / str(i), **over), engine=fresh_engine, console=False
        )
        try:
            assert plan_step(trainer, 0).actor_forward is needed, over
        finally:
            trainer.close()


def test_skipped_forward_trains_as_the_full_one(tmp_path, vllm_engine, initial_policy_weights):
    skipped, hist, plan = _run(tmp_path / "skip", vllm_engine, initial_policy_weights, **KL_IN_LOSS)
    assert plan.actor_forward is False
    full, full_hist, _ = _run(
        tmp_path / "full",
        vllm_engine,
        initial_policy_weights,
        **KL_IN_LOSS,
        **{"train_config.skip_redundant_actor_forward": False},
    )
    timeline_names = {name for name, *_ in hist[-1]["timeline"]}
    assert "actor.forward" not in timeline_names and "actor.train" in timeline_names
    assert "actor.forward" in {name for name, *_ in full_hist[-1]["timeline"]}
    assert "kl" not in hist[-1] and "actor/kl_loss" in hist[-1]
    assert hist[-1]["actor/approx_kl"] == 0.0 and hist[-1]["actor/clip_frac"] == 0.0
    # Same samples and rewards; the ratio was exactly 1 instead of 1 up to rounding.
    assert [h["reward"] for h in hist] == [h["reward"] for h in full_hist]
    for part in ("actor", "critic"):
        diff = _max_diff(skipped[part], full[part])
        print(f"skipped vs full actor forward: {part} max |difference| = {diff:.3g}")
        assert diff <= 1e-4, (part, diff)
    assert _max_diff(skipped["actor"], initial_policy_weights) > 1e-3  # it trained


def test_skipped_forward_pipelined_equals_serial(tmp_path, vllm_engine, initial_policy_weights):
    runs = {
        m: _run(
            tmp_path / f"m{m}",
            vllm_engine,
            initial_policy_weights,
            PIPE_MICRO_BATCH_NUM=m,
            **KL_IN_LOSS,
            **{"repeater_config.norm_rewards": False},
        )
        for m in (1, 4)
    }
    for part in ("actor", "critic"):
        a, b = runs[1][0][part], runs[4][0][part]
        assert all(torch.equal(a[k], b[k]) for k in a), (part, _max_diff(a, b))
