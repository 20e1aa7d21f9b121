"""new_token_limit on the transformers backend: each row is cut at its own limit."""

from types import SimpleNamespace

from rlhf_pipe.models import load_causal_lm
from rlhf_pipe.rollout.hf_engine import HFEngine
from rlhf_pipe.rollout.types import SamplingSettings


def test_answers_fill_the_sequence_per_prompt(tiny_assets):
    model = load_causal_lm(str(tiny_assets.policy), "float32", False, "policy")
    engine = HFEngine(model, pad_token_id=0, eos_token_id=2, chunk_size=3)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    done = []
    engine.generate(
        prompts,
        [0, 1, 2],
        SamplingSettings(4, ignore_eos=True, max_seq_len=12),
        [1, 2, 3],
        SimpleNamespace(put=done.append),
    )
    assert sorted(len(c.prompt_ids) + len(c.response_ids) for c in done) == [12, 12, 12]
    assert {c.finish_reason for c in done} == {"length"}


def test_pause_gc_turns_the_collector_off_only_while_generating(tiny_assets):
    """rollout_config.pause_gc on the transformers backend, as on vLLM
    (tests/rollout/test_vllm_engine.py)."""
    import gc

    model = load_causal_lm(str(tiny_assets.policy), "float32", False, "policy")
    enabled_at_put: list[bool] = []
    sink = SimpleNamespace(put=lambda c: enabled_at_put.append(gc.isenabled()))
    for pause in (True, False):
        engine = HFEngine(model, pad_token_id=0, eos_token_id=2, pause_gc=pause)
        engine.generate([[5, 6], [7]], [0, 1], SamplingSettings(3, ignore_eos=True), [1, 2], sink)
        assert gc.isenabled()
    assert enabled_at_put == [False, False, True, True]
