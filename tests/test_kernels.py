"""kernels.py on the tiny model: 'compile' gives the plain path's log-probs and gradients with
one graph for chunks of any length; 'liger' is refused where there is no GPU, in one line
naming the key (its GPU run is tests/gpu/test_gpu_kernels.py)."""

import pytest
import torch
from torch._dynamo.utils import counters

from rlhf_pipe.config import ConfigError
from rlhf_pipe.kernels import apply_kernels, liger_modules
from rlhf_pipe.models import load_causal_lm, response_logprobs
from rlhf_pipe.pipeline.batch import Sample, collate
from rlhf_pipe.protocols import Role
from rlhf_pipe.roles import LossSettings, PolicyRole
from tests.conftest import tiny_config

LOSS = LossSettings(0.2, None, 1.0, 1.0, "token_mean")
KEY = "model_configs.policy.trainer_config.kernels"


def _samples(n: int, prompt: int, answer: int, seed: int) -> list[Sample]:
    """n samples whose prompt and answer lengths differ by row, so the chunk is padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = prompt + i % 3, answer - i % 2
        s = Sample(
            i,
            i,
            0,
            torch.randint(4, 500, (p,), generator=g),
            torch.randint(4, 500, (r,), generator=g),
        )
        s.advantages = torch.randn(r, generator=g)
        out.append(s)
    return out


def _role(model) -> PolicyRole:
    return PolicyRole(
        model,
        0,
        lr=1e-3,
        betas=[0.9, 0.95],
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        max_grad_norm=1.0,
        infer_micro_bs=4,
        train_micro_bs=4,
    )


def _max_rel(a: dict, b: dict) -> float:
    """max over tensors of max |a - b| / max |a|."""
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)


def test_compile_matches_plain_and_compiles_once_for_every_length(tiny_assets):
    path = str(tiny_assets.policy)
    graphs = counters["stats"]["unique_graphs"]
    plain = _role(load_causal_lm(path))
    compiled = _role(apply_kernels(load_causal_lm(path), "compile", "cpu", "policy"))
    assert counters["stats"]["unique_graphs"] == graphs  # compiling is lazy: at the first call

    first, other = _samples(4, 6, 5, 0), _samples(3, 9, 7, 1)  # other: longer P and R, b = 3
    for role in (plain, compiled):
        role.train(first, LOSS, 4)
    grads = [{n: p.grad.clone() for n, p in r.model.named_parameters()} for r in (plain, compiled)]
    # fp32: inductor's fused kernels reorder a few sums (measured: 8e-7 of the largest grad).
    assert _max_rel(*grads) < 1e-5
    for role in (plain, compiled):
        role.apply_step(role.prepare_step(float(sum(s.num_actions for s in first))))
    # After the step, a chunk of other lengths: the same log-probs, from the same graph.
    batch = collate(other, 0)
    logp = [response_logprobs(r.model, batch, 0)[0] for r in (plain, compiled)]
    mask = batch.response_mask.bool()
    torch.testing.assert_close(logp[1][mask], logp[0][mask], rtol=0, atol=1e-5)
    # One graph, shared by both layers, for the train pass (grad on, padded rows): the second
    # chunk's other batch size and widths are dynamic dimensions, not a recompile.
    assert counters["stats"]["unique_graphs"] == graphs + 1


@pytest.mark.slow
def test_compile_with_checkpointing_under_zero2_matches_plain(tmp_path):
    """The builders' path: validation, kernels at load, gradient checkpointing, DeepSpeed ZeRO-2
    (one-rank gloo on the CPU accelerator)."""
    from rlhf_pipe.builders import build_roles
    from rlhf_pipe.zero import _named_full_weights

    weights = {}
    for kernels in (None, "compile"):
        cfg = tiny_config(
            tmp_path / str(kernels),
            **{
                KEY: kernels,
                "model_configs.policy.trainer_config.gradient_checkpointing": True,
                "model_configs.policy.trainer_config.deepspeed_config": {
                    "zero_optimization": {"stage": 2}
                },
            },
        )
        actor = build_roles(cfg, [Role.ACTOR], 0, torch.device("cpu"))[Role.ACTOR]
        graphs = [counters["stats"]["unique_graphs"]]
        for samples in (_samples(4, 6, 5, 0), _samples(3, 9, 7, 1)):
            actor.train(samples, LOSS, 7)
            graphs.append(counters["stats"]["unique_graphs"])
        actor.apply_step(actor.prepare_step(33.0))
        # At most one graph (none where the test above compiled the layer's already: the
        # checkpointed layer runs the same graph), none more for the second chunk.
        assert graphs[2] == graphs[1] <= graphs[0] + 1
        weights[kernels] = dict(_named_full_weights(actor.model, actor.stage))
    # One Adam step at lr 3e-3 turns last-bit gradient differences into lr-sized relative
    # ones on near-zero gradients (as in tests/test_zero.py; measured 3e-5 without checkpointing).
    diff = max((weights[None][k] - weights["compile"][k]).abs().max().item() for k in weights[None])
    assert diff < 1e-4


def test_liger_is_refused_without_a_gpu_in_one_line(tmp_path, tiny_assets):
    with pytest.raises(
        ConfigError,
        match=rf"{KEY}: 'liger' runs Triton kernels on a CUDA GPU, but placement_config.device is 'cpu' \(use 'compile' or None\)$",
    ):
        tiny_config(tmp_path, **{KEY: "liger", "placement_config.device": "cpu"})
    # A device known only at load ('auto' on a machine without a GPU, torchrun ranks).
    model = load_causal_lm(str(tiny_assets.policy))
    with pytest.raises(
        ConfigError,
        match=rf"^{KEY}: 'liger' runs Triton kernels on a CUDA GPU, but this model runs on cpu",
    ):
        apply_kernels(model, "liger", torch.device("cpu"), "policy")
    assert not liger_modules(model)


def test_kernels_config_errors(tmp_path):
    with pytest.raises(
        ConfigError, match=rf"{KEY}: expected 'liger' or 'compile' or None, got 'triton'"
    ):
        tiny_config(tmp_path, **{KEY: "triton"})
    with pytest.raises(
        ConfigError,
        match=r"model_configs.reward.trainer_config.kernels: set, but there is no model_path",
    ):
        tiny_config(tmp_path, **{"model_configs.reward.trainer_config.kernels": "compile"})
    with pytest.raises(ConfigError, match=rf"{KEY}: 'compile' under ZeRO-3: DeepSpeed gathers"):
        tiny_config(
            tmp_path,
            **{
                KEY: "compile",
                "model_configs.policy.trainer_config.deepspeed_config": {
                    "zero_optimization": {"stage": 3}
                },
            },
        )
    cfg = tiny_config(
        tmp_path, **{KEY: "compile", "model_configs.critic.trainer_config.kernels": "liger"}
    )
    assert cfg.model_configs.policy.trainer_config.kernels == "compile"
    assert cfg.model_configs.reference.trainer_config.kernels is None


def test_liger_patches_this_instance_and_not_later_models(tiny_assets, monkeypatch):
    """Patching only (the kernels run on a GPU): liger's norm and MLP on this model's modules,
    transformers' classes back for the models loaded after it, the head left alone."""
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    # liger replaces the module-level rotary function (it stays, see rlhf_pipe.kernels): put it
    # back after the test, the other tests run transformers' own on the CPU.
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    model = load_causal_lm(str(tiny_assets.policy))
    layers = model.config.num_hidden_layers
    from rlhf_pipe.kernels import _apply_liger

    _apply_liger(model, torch.device("cuda"), KEY)  # "cuda": the device check passes
    assert liger_modules(model) == {"LigerRMSNorm": 2 * layers + 1, "LigerSwiGLUMLP": layers}
    assert "forward" not in vars(model)  # no fused linear cross entropy: our head is ours
    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    assert not liger_modules(load_causal_lm(str(tiny_assets.policy)))
