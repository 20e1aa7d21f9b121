"""The timing workloads' model shapes: parameter counts of the real models they stand for,
counted on the meta device (no weights drawn)."""

import pytest
import torch

from rlhf_pipe.assets.shaped import SHAPES, shape_classes, shape_config


@pytest.mark.parametrize(
    "shape,params",
    [
        ("qwen2-0.5b", 494_032_768),  # Qwen2-0.5B, tied embeddings
        ("internlm2-1.8b", 1_889_110_016),  # InternLM2-1.8B, untied head
    ],
)
def test_shaped_policy_has_the_real_models_parameter_count(shape, params):
    causal_cls = shape_classes(SHAPES[shape][0])[1]
    with torch.device("meta"):
        model = causal_cls(shape_config(shape))
    assert sum(p.numel() for p in model.parameters()) == params
