"""Packed model batches (samples back to back in one row) against padded ones.

Packing must change only the cost: every per-token result (log-probs, values, scores,
gradients) equals the padded batch's up to float rounding, for the transformers families the
project runs (Llama from the tiny assets, Qwen2 built here), and a model that cannot keep
packed samples apart is padded, or refused in one line when packing is forced.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlhf_pipe.models import (
    load_causal_lm,
    load_value_model,
    packing_supported,
    response_logits,
    sequence_scores,
    token_values,
)
from rlhf_pipe.pipeline.batch import PackedBatch, Sample, collate
from rlhf_pipe.ppo import core
from rlhf_pipe.roles import choose_packing

# (prompt, answer) lengths: uneven, one empty answer, one single-token prompt.
LENGTHS = [(3, 5), (7, 1), (1, 9), (5, 0), (4, 4)]


def _samples(vocab: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    return [
        Sample(
            i,
            i,
            0,
            torch.randint(3, vocab, (p,), generator=g),
            torch.randint(3, vocab, (r,), generator=g),
        )
        for i, (p, r) in enumerate(LENGTHS)
    ]


def _logprobs(model, b):
    return b.rows(core.logprobs_from_logits(response_logits(model, b), b.labels))


@pytest.fixture(scope="module")
def qwen2_models():
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    cfg = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(cfg).eval()
    value = Qwen2ForSequenceClassification(Qwen2Config(**{**cfg.to_dict(), "num_labels": 1})).eval()
    return lm, value


@pytest.fixture(scope="module")
def llama_models(tiny_assets):
    return load_causal_lm(str(tiny_assets.policy)), load_value_model(str(tiny_assets.critic))


@pytest.mark.parametrize("family", ["llama_models", "qwen2_models"])
def test_packed_equals_padded(family, request):
    lm, value = request.getfixturevalue(family)
    samples = _samples(lm.config.vocab_size)
    padded, packed = collate(samples, 0), collate(samples, 0, packed=True)
    mask = padded.response_mask
    assert packed.input_ids.shape[1] == sum(p + r for p, r in LENGTHS)  # no padding tokens
    assert packed.input_ids.shape[1] < padded.input_ids.numel()
    with torch.no_grad():
        for fn in (_logprobs, lambda m, b: token_values(value, b)):
            want, got = fn(lm, padded) * mask, fn(lm, packed)
            assert got.shape == mask.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert (got[mask == 0] == 0).all()
        torch.testing.assert_close(
            sequence_scores(value, packed), sequence_scores(value, padded), atol=1e-5, rtol=1e-5
        )


def test_samples_do_not_see_each_other(qwen2_models):
    """The control: positions that run on across samples make one long sequence, and the
    results change. So the equality above depends on the restarted position ids."""
    lm, _ = qwen2_models
    samples = _samples(lm.config.vocab_size)
    packed = collate(samples, 0, packed=True)
    joined = PackedBatch(
        packed.input_ids,
        torch.arange(packed.input_ids.shape[1])[None],
        packed.response_mask,
        packed.predict_index,
        packed.token_row,
        packed.token_col,
        packed.last_index,
    )
    with torch.no_grad():
        diff = (_logprobs(lm, joined) - _logprobs(lm, packed)).abs().max()
    assert diff > 1e-2


def test_packed_gradients_equal_padded(qwen2_models):
    lm, _ = qwen2_models
    samples = _samples(lm.config.vocab_size, seed=1)
    grads = []
    for packed in (False, True):
        lm.zero_grad(set_to_none=True)
        b = collate(samples, 0, packed=packed)
        loss = core.aggregate(_logprobs(lm, b), b.response_mask, 1.0)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    assert grads[0].abs().sum() > 0


class _RemoteCodeLM(nn.Module):
    """Stands for a trust_remote_code model: its class lives outside transformers."""

    def __init__(self, config):
        super().__init__()
        self.config = config


def test_models_that_cannot_pack_are_padded_or_refused(qwen2_models):
    lm, _ = qwen2_models
    assert packing_supported(lm) == (True, "")
    remote = _RemoteCodeLM(lm.config)
    ok, why = packing_supported(remote)
    assert not ok and "_RemoteCodeLM" in why
    assert choose_packing(remote, "auto", "actor") is False
    assert choose_packing(lm, True, "actor") is True
    assert choose_packing(lm, False, "actor") is False
    with pytest.raises(ValueError, match=r"cfg\.py: train_config\.pack_sequences=True, but actor"):
        choose_packing(remote, True, "actor", "cfg.py")
    # 'auto' packs only with a variable-length attention kernel: sdpa would need a dense mask.
    assert choose_packing(lm, "auto", "actor") is False
    try:
        lm.config._attn_implementation = "flash_attention_2"
        assert choose_packing(lm, "auto", "actor") is True
        lm.config._attn_implementation = "some_kernel"
        assert packing_supported(lm)[0] is False
        assert choose_packing(lm, "auto", "actor") is False
    finally:
        lm.config._attn_implementation = "sdpa"


def test_trainer_packs_every_model_when_asked(tmp_path, fresh_engine, tiny_assets):
    from rlhf_pipe.trainer import RLHFTrainer
    from tests.conftest import tiny_config

    over = {"model_configs.reward.model_path": str(tiny_assets.reward)}
    for mode, want in ((True, True), ("auto", False)):  # the tiny models run sdpa
        trainer = RLHFTrainer(
            tiny_config(tmp_path / str(mode), **over, **{"train_config.pack_sequences": mode}),
            engine=fresh_engine,
            console=False,
        )
        try:
            assert (trainer.actor.packed, trainer.critic.packed, trainer.reference.packed) == (
                want,
                want,
                want,
            )
            assert bool(trainer.reward.packed_scorers) is want
        finally:
            trainer.close()
