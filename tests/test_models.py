"""models.py on the tiny assets: one-line load errors, and the shapes of the per-token and
per-sequence heads."""

import pytest
import torch

from rlhf_pipe.models import (
    ModelLoadError,
    load_causal_lm,
    load_tokenizer,
    load_value_model,
    response_logprobs,
    sequence_scores,
    token_values,
)
from rlhf_pipe.pipeline.batch import Sample, collate


def test_a_missing_or_empty_folder_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="policy: model folder not found"):
        load_causal_lm(str(tmp_path / "nope"), "float32", False, "policy")
    with pytest.raises(ModelLoadError, match=r"critic: no weights \(\*.safetensors"):
        load_value_model(str(tmp_path), "float32", False, "critic")


def test_heads_give_one_value_per_response_token_and_per_sample(tiny_assets):
    tok = load_tokenizer(str(tiny_assets.policy))
    samples = [
        Sample(0, 0, 0, torch.tensor([1, 5, 6]), torch.tensor([7, 8])),
        Sample(1, 1, 0, torch.tensor([1, 9]), torch.tensor([10, 11, 12])),
    ]
    batch = collate(samples, pad_id=tok.pad_token_id or 0)
    policy = load_causal_lm(str(tiny_assets.policy), "float32", False, "policy")
    logp = response_logprobs(policy, batch, 0)[0]
    assert logp.shape == (2, 3)
    assert (logp <= 0).all()
    value = load_value_model(str(tiny_assets.policy), "float32", False, "critic")
    assert token_values(value, batch).shape == (2, 3)
    assert sequence_scores(value, batch).shape == (2,)
