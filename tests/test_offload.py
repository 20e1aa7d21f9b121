"""placement_config.ref_reward_offload: reference and learned reward scorers wait in host memory
between calls and give the same numbers as resident models. On CPU the moves are no-ops, so
this checks the wiring and the results; tests/gpu/test_gpu_single.py checks the moves."""

import torch

from rlhf_pipe.models import load_causal_lm, load_value_model
from rlhf_pipe.pipeline.batch import Sample
from rlhf_pipe.roles import ReferenceRole, RewardRole, Scorer
from tests.conftest import tiny_config


def _samples():
    g = torch.Generator().manual_seed(0)
    return [
        Sample(
            i,
            i,
            0,
            torch.randint(3, 500, (4 + i,), generator=g),
            torch.randint(3, 500, (3 + 2 * i,), generator=g),
            "p",
            "r",
        )
        for i in range(5)
    ]


def offload_roles(tiny_assets, device, offload):
    ref = ReferenceRole(load_causal_lm(str(tiny_assets.policy)).to(device), 0, 2, offload=offload)
    rm = load_value_model(str(tiny_assets.reward), "float32", False, "reward").to(device)
    reward = RewardRole([Scorer("rm", 1.0, "model", rm)], 0, 2, offload=offload)
    return ref, reward


def test_offloaded_roles_give_the_same_numbers(tiny_assets):
    samples = _samples()
    (ref, reward), (ref_off, reward_off) = (
        offload_roles(tiny_assets, "cpu", o) for o in (False, True)
    )
    for a, b in zip(ref.logprobs(samples), ref_off.logprobs(samples)):
        assert torch.equal(a, b)
    for a, b in zip(reward.scores(samples), reward_off.scores(samples)):
        assert torch.equal(a, b)


def test_the_config_key_reaches_the_roles(tmp_path, tiny_assets):
    from rlhf_pipe.trainer import build_roles

    cfg = tiny_config(tmp_path, **{"placement_config.ref_reward_offload": True})
    roles = build_roles(cfg, ("reference", "reward"), 0, torch.device("cpu"))
    assert roles["reference"].offload and roles["reward"].offload
