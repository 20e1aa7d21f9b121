"""Which weight sync a torchrun run gets (rlhf_pipe.train._direct_sync), with and without
run-ahead: the direct broadcast from the actor's rank ('nccl' on GPUs, 'gloo_direct' anywhere)
carries run-ahead's per-step snapshots too, so max_staleness no longer changes the choice; the
refusals left are the layouts the broadcast cannot serve. GPU facts (CUDA present, 2 GPUs,
torchrun's LOCAL_WORLD_SIZE) are set where a case needs them: this machine has no GPU."""

import pytest
import torch

from rlhf_pipe.config import ConfigError
from rlhf_pipe.placement import make_placement
from rlhf_pipe.run_args import UserError
from rlhf_pipe.train import _direct_sync, _role_ranks
from tests.conftest import tiny_config

ZERO3_DP2 = {
    "model_configs.policy.trainer_config.parallel.data.size": 2,
    "model_configs.policy.trainer_config.deepspeed_config": {"zero_optimization": {"stage": 3}},
}
# Rank 0 runs vLLM on GPU 0, the actor (rank 1) and the others share GPU 1.
ACTOR_OWN_GPU = {
    "placement_config.device": "cuda",
    "placement_config.local_rank_gpus": [0, 1, 1, 1],
}


def _pick(tmp_path, **over):
    cfg = tiny_config(tmp_path, **over)
    placement = make_placement(cfg)
    return _direct_sync(cfg, placement, _role_ranks(placement))


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")


@pytest.mark.parametrize("s", [0, 1, 2])
def test_choice_does_not_depend_on_max_staleness_on_the_cpu(tmp_path, s):
    stale = {"train_config.max_staleness": s}
    assert _pick(tmp_path, **stale) is None  # 'auto': through the controller (no GPU)
    assert _pick(tmp_path, **stale, **{"train_config.weight_sync_backend": "gloo"}) is None
    assert _pick(tmp_path, **stale, **{"train_config.weight_sync_backend": "gloo_direct"}) == (
        "gloo"
    )


@pytest.mark.parametrize("s", [0, 1])
def test_auto_and_nccl_take_nccl_with_the_actor_on_a_gpu_of_its_own(tmp_path, two_gpus, s):
    stale = {"train_config.max_staleness": s, **ACTOR_OWN_GPU}
    assert _pick(tmp_path, **stale) == "nccl"
    assert _pick(tmp_path, **stale, **{"train_config.weight_sync_backend": "nccl"}) == "nccl"
    # The actor on vLLM's GPU: 'auto' goes through the controller, 'nccl' is refused.
    shared = {**stale, "placement_config.local_rank_gpus": [0, 0, 1, 1]}
    assert _pick(tmp_path, **shared) is None
    with pytest.raises(UserError, match=r"weight_sync_backend: 'nccl' needs the actor \(rank 1\)"):
        _pick(tmp_path, **shared, **{"train_config.weight_sync_backend": "nccl"})


def test_nccl_needs_a_gpu_at_any_staleness(tmp_path):
    over = {"train_config.max_staleness": 1, "train_config.weight_sync_backend": "nccl"}
    with pytest.raises(UserError, match=r"^\S+: train_config.weight_sync_backend: 'nccl' needs"):
        _pick(tmp_path, **over)


@pytest.mark.parametrize("backend", ["nccl", "gloo_direct"])
def test_a_zero3_actor_on_two_ranks_is_refused_and_auto_goes_through_the_controller(
    tmp_path, two_gpus, monkeypatch, backend
):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "5")  # rollout, actor x 2, critic, reference
    over = {"train_config.max_staleness": 1, **ZERO3_DP2, **ACTOR_OWN_GPU}
    over["placement_config.local_rank_gpus"] = [0, 1, 1, 1, 1]
    assert _pick(tmp_path, **over) is None
    with pytest.raises(UserError) as err:
        _pick(tmp_path, **over, **{"train_config.weight_sync_backend": backend})
    assert f"train_config.weight_sync_backend: {backend!r} is not built for a ZeRO-3" in str(
        err.value
    ) and "\n" not in str(err.value)


def test_gloo_direct_needs_the_actor_off_the_engines_ranks(tmp_path):
    # The hf generator runs on the actor's rank: sender and receiver would be one process.
    over = {
        "train_config.max_staleness": 1,
        "train_config.weight_sync_backend": "gloo_direct",
        "model_configs.policy.generator_config.generator_type": "hf",
    }
    with pytest.raises(UserError, match=r"'gloo_direct' needs the actor \(rank 0\) on a rank"):
        _pick(tmp_path, **over)


@pytest.mark.parametrize("backend", ["nccl", "gloo_direct"])
def test_lora_adapter_sync_is_refused_over_a_direct_sync_naming_the_key(tmp_path, backend):
    over = {
        "model_configs.policy.trainer_config.enable_lora": True,
        "model_configs.policy.generator_config.lora_sync": "adapter",
        "train_config.weight_sync_backend": backend,
    }
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, **over)
    assert f"lora_sync: 'adapter' cannot go over train_config.weight_sync_backend {backend!r}" in (
        str(err.value)
    )
