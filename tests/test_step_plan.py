"""step_plan: the planner's prompts, seeds, relay and PTX for the tiny config, with no models."""

import json

import pytest

from rlhf_pipe.builders import build_prompt_source, build_tokenizer
from rlhf_pipe.data import RelayBuffer
from rlhf_pipe.step_plan import (
    StepPlanner,
    build_ptx,
    episode_records,
    request_seed,
    sampling_settings,
)
from rlhf_pipe.trainer import step_sizes
from tests.conftest import tiny_config


def planner(cfg, relay_fn=None, relay=None):
    """A planner over fresh data sources of `cfg` (as a new trainer would have)."""
    tok = build_tokenizer(cfg)
    t = cfg.train_config
    return StepPlanner(
        t,
        cfg.rollout_config,
        cfg.repeater_config,
        step_sizes(cfg),
        prompts=build_prompt_source(cfg, tok),
        ranking=False,
        relay=relay or RelayBuffer(t.max_relay_episode, t.relay_episode_offset),
        relay_sample_fn=relay_fn,
        ptx=build_ptx(cfg.pretrain_dataset_config, t.pretrain_loss_weight, tok, cfg.constants),
        tokenizer=tok,
    )


def test_same_step_from_the_same_start_gives_the_same_plan(tmp_path):
    cfg = tiny_config(tmp_path)
    a, b = planner(cfg).plan(0, 0), planner(cfg).plan(0, 0)
    assert a.prompt_ids == b.prompt_ids and a.seeds == b.seeds
    assert len(a.prompt_ids) == 16 and a.samples_per_step == 16 * cfg.rollout_config.n
    assert a.pipe_micro_bs == cfg.plan.pipe_micro_bs and a.relay == []
    assert a.seeds == [request_seed(cfg.rollout_config.seed, 0, i) for i in range(16)]
    assert a.sampling == sampling_settings(cfg.rollout_config)
    assert a.ptx_token_ids is None  # no pretrain_dataset_config


def test_seeds_change_with_the_step_and_the_source_advances(tmp_path):
    p = planner(tiny_config(tmp_path))
    first, second = p.plan(0, 0), p.plan(1, 0)
    assert set(first.seeds).isdisjoint(second.seeds)
    assert p.prompts.state_dict() != planner(tiny_config(tmp_path)).prompts.state_dict()


def test_eval_sampling_takes_the_eval_values_and_one_answer(tmp_path):
    r = tiny_config(tmp_path, **{"rollout_config.eval_temperature": 0.0}).rollout_config
    assert sampling_settings(r, evaluation=True).temperature == 0.0
    assert sampling_settings(r).temperature == 1.0


def replayed(count):
    """A relay_sample_fn returning `count` answers of one past prompt each."""

    def fn(episodes):
        return [
            {"prompt_ids": [5, 6], "response_ids": [7], "episode_id": 0, "prompt_index": j}
            for j in range(count)
        ]

    return fn


def relay_with_one_episode():
    relay = RelayBuffer(-1)
    relay.add(0, [{"prompt_ids": [5, 6], "response_ids": [7]}])
    return relay


@pytest.mark.parametrize("mode, prompts, samples", [("fixed", 13, 16), ("dynamic", 16, 19)])
def test_fixed_relay_replaces_prompts_dynamic_adds_them(tmp_path, mode, prompts, samples):
    cfg = tiny_config(
        tmp_path,
        **{"train_config.stream_data_loader_type": mode, "train_config.max_relay_episode": -1},
    )
    plan = planner(cfg, replayed(3), relay_with_one_episode()).plan(1, 0)
    assert len(plan.prompt_ids) == prompts and plan.samples_per_step == samples
    assert [c.sample_id for c in plan.relay] == list(range(prompts, prompts + 3))
    assert [c.prompt_index for c in plan.relay] == list(range(prompts, prompts + 3))
    assert all(c.extra["relay_from"] == 0 for c in plan.relay)
    assert len(plan.prompt_texts) == prompts + 3


def test_no_relay_before_the_first_episode(tmp_path):
    cfg = tiny_config(tmp_path, **{"train_config.max_relay_episode": -1})
    assert planner(cfg, replayed(3)).plan(0, 0).relay == []


def test_bad_relay_items_are_refused(tmp_path):
    cfg = tiny_config(tmp_path, **{"train_config.max_relay_episode": -1})
    bad = planner(cfg, lambda eps: [{"prompt_ids": [], "response_ids": [1]}])
    bad.relay = relay_with_one_episode()
    with pytest.raises(ValueError, match="item 0: expected a dict"):
        bad.plan(1, 0)
    too_many = planner(cfg, replayed(17), relay_with_one_episode())
    with pytest.raises(ValueError, match="returned 17 samples; a 'fixed' step holds 16"):
        too_many.plan(1, 0)


def test_ptx_texts_are_drawn_into_the_plan(tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": f"some text {i}"}) + "\n" for i in range(3)))
    cfg = tiny_config(
        tmp_path,
        **{
            "pretrain_dataset_config": {"samples_each_epoch": 2, "message_datasets": [str(path)]},
            "train_config.pretrain_loss_weight": 0.5,
        },
    )
    plan = planner(cfg).plan(0, 0)
    assert len(plan.ptx_token_ids) == 2 and plan.ptx_weight == 0.5
    assert all(len(ids) > 1 for ids in plan.ptx_token_ids)


def test_episode_records_keep_fresh_samples_in_id_order():
    import torch

    from rlhf_pipe.pipeline.batch import Sample

    def s(i, relay_from=None):
        return Sample(
            i,
            0,
            1,
            torch.tensor([1]),
            torch.tensor([2, 3]),
            relay_from=relay_from,
            score=torch.tensor(float(i)),
        )

    recs = episode_records(4, [s(2), s(0), s(1, relay_from=3)])
    assert [r["sample_id"] for r in recs] == [0, 2]
    assert recs[1] == {**recs[1], "episode_id": 4, "response_ids": [2, 3], "score": 2.0}
