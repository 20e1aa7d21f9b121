"""The NCCL weight sync on two GPUs (rlhf_pipe.rollout.nccl_sync): a sender on GPU 1, a
multiprocess vLLM engine on GPU 0. Run this file in a pytest process of its own (the engine
core must be a separate process, unlike test_gpu_single.py's in-process engine)."""

import threading

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs")]


def test_nccl_sync_reaches_the_engine(tiny_assets, initial_policy_weights):
    from rlhf_pipe.rollout.nccl_sync import WeightSender, bucket_layout, free_address
    from rlhf_pipe.rollout.types import SamplingSettings
    from rlhf_pipe.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(tiny_assets.policy), dtype="float32", seed=0, max_model_len=64,
                        gpu_memory_utilization=0.2, in_process=False, nccl_weight_sync=True,
                        visible_devices="0")
    host, port = free_address()
    device = torch.device("cuda", 1)
    sender = {}
    joiner = threading.Thread(
        target=lambda: sender.setdefault("s", WeightSender(host, port, 2, device)))
    joiner.start()
    engine.init_weight_group(host, port, 1, 2)
    joiner.join(120)

    def greedy():
        out = []

        class Sink:
            def put(self, c):
                out.append(c.response_ids)

        settings = SamplingSettings(max_new_tokens=6, temperature=0.0, ignore_eos=True)
        engine.generate([[5, 6, 7]], [0], settings, [0], Sink())
        return out[0]

    def sync(weights, version):
        named = [(k, v.to(device)) for k, v in weights.items()]
        # Small buckets: several broadcasts, and buckets that split the layers.
        layout = bucket_layout(named, 64 * 1024)
        t = threading.Thread(target=lambda: sender["s"].send(named, layout))
        t.start()
        engine.receive_weights(layout, version)
        t.join(60)
        return layout

    before = greedy()
    boosted = initial_policy_weights["lm_head.weight"].clone()
    boosted[42] += 100.0
    layout = sync({**initial_policy_weights, "lm_head.weight": boosted}, 1)
    assert len(layout) > 1
    assert greedy() == [42] * 6 and engine.version == 1
    sync(initial_policy_weights, 2)
    assert greedy() == before
    print("nccl sync:", engine.last_sync, "buckets", len(layout))
