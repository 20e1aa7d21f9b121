"""trainer_state: a checkpoint's state round trip puts data positions, relay and RNG back."""

import random

import pytest
import torch

from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import tiny_config

HF = {"model_configs.policy.generator_config.generator_type": "hf"}  # no vLLM needed here


@pytest.fixture
def trainer(tmp_path, tiny_assets):
    cfg = tiny_config(tmp_path, **HF, **{"train_config.max_relay_episode": -1})
    t = RLHFTrainer(cfg, console=False)
    yield t
    t.close()


def test_save_then_load_restores_what_the_next_step_reads(trainer):
    trainer.prompts.next_batch(5)
    trainer.relay.add(0, [{"prompt_ids": [1], "response_ids": [2]}])
    trainer.pipeline.running.update(torch.tensor([1.0, 3.0]))
    trainer.version = 2
    path = trainer.folder.save(
        7,
        trainer.actor,
        trainer.critic,
        trainer.tokenizer,
        trainer.state.state_dict(7, trainer.version),
    )
    data, running = trainer.prompts.state_dict(), trainer.pipeline.running.state_dict()
    expect_rng = (random.random(), torch.rand(1))
    random.seed(0), torch.manual_seed(0)  # back to other positions before the load
    random.random(), torch.rand(1)
    lr = trainer.actor.training_state()
    # Moved on after the save: all of this must come back.
    trainer.prompts.next_batch(3)
    trainer.relay.add(1, [])
    trainer.pipeline.running.update(torch.tensor([10.0]))
    random.seed(123)
    torch.manual_seed(123)

    loaded = trainer.state.load(path)
    assert (loaded["step"], loaded["version"]) == (7, 2)
    assert trainer.prompts.state_dict() == data
    assert [e.episode_id for e in trainer.relay.episodes] == [0]
    assert trainer.pipeline.running.state_dict() == running
    assert (random.random(), torch.rand(1)) == expect_rng
    assert trainer.actor.training_state().keys() == lr.keys()


def test_state_dict_holds_every_part(trainer):
    state = trainer.state_dict()
    assert {
        "step",
        "version",
        "actor",
        "critic",
        "data",
        "ptx",
        "relay",
        "running_rewards",
        "rng",
    } <= state.keys()
    assert state["step"] == trainer.step_index == 0 and state["ptx"] is None
