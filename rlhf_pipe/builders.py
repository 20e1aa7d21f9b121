"""Build what a run needs from its config: the roles (local or under DeepSpeed), the reward's
scorers and the generation engine. The trainer and every distributed rank use these."""

from __future__ import annotations

import copy
import importlib
import json
import random
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from rlhf_pipe import lora
from rlhf_pipe.config import (
    ConfigError,
    ModelConfig,
    PromptDatasetConfig,
    RunConfig,
)
from rlhf_pipe.data import PromptSource, parse_dataset_spec
from rlhf_pipe.kernels import apply_kernels
from rlhf_pipe.models import (
    check_tokenizer_matches,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
    load_value_model,
)
from rlhf_pipe.protocols import Role
from rlhf_pipe.roles import (
    CriticRole,
    PolicyRole,
    ReferenceRole,
    RewardRole,
    Scorer,
    choose_packing,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_function(name: str, what: str = "reward_fn"):
    """'package.module:function' -> the function, with a one-line error if it is not there."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what} {name!r}: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{what} {name!r}: {module_name} has no function {attr!r}")
    return fn


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("placement_config.device: 'cuda' asked for, but no GPU is visible")
    return torch.device(choice)


def build_roles(
    cfg: RunConfig, names, pad_id: int, device, reward_fn=None, dp_groups: dict | None = None
) -> dict:
    """The named roles as models in this process (the ones the config has). A role with a
    deepspeed_config runs under DeepSpeed (rlhf_pipe.zero) on its `dp_groups` group; a plain
    role on several ranks all-reduces its gradients on it."""
    t, mc = cfg.train_config, cfg.model_configs
    sizes = dict(
        infer_micro_bs=t.infer_micro_bs,
        train_micro_bs=t.train_micro_bs,
        logit_chunk_tokens=t.logit_chunk_tokens,
    )
    groups = dp_groups or {}
    offload = cfg.placement_config.ref_reward_offload  # not for ZeRO-3: it is partitioned
    roles: dict = {}
    for name in map(Role, names):
        if name == Role.ACTOR or (name == Role.CRITIC and mc.critic is not None):
            actor = name == Role.ACTOR
            mcfg = mc.policy if actor else mc.critic
            loader = load_causal_lm if actor else load_value_model
            model = loader(
                mcfg.model_path,
                mcfg.trainer_config.torch_dtype,
                mcfg.trust_remote_code,
                name.config_key,
            )
            apply_kernels(model, mcfg.trainer_config.kernels, device, name.config_key)
            if mcfg.trainer_config.enable_lora:
                model = lora.apply_lora(
                    model, cfg.plan.lora[name.config_key].peft_kwargs(), cfg.source, name.config_key
                )
            role_cls, zero_cls = (
                (PolicyRole, "ZeroPolicyRole") if actor else (CriticRole, "ZeroCriticRole")
            )
            extra = {"lora_sync": cfg.plan.lora_sync or "merged"} if actor else {}
            roles[name] = _trained_role(
                role_cls,
                zero_cls,
                model.to(device),
                pad_id,
                mcfg.trainer_config,
                sizes,
                device,
                groups.get(name),
                packed=choose_packing(model, t.pack_sequences, name, cfg.source),
                **extra,
            )
        elif name == Role.REFERENCE and mc.reference is not None:
            ref = mc.reference
            model = load_causal_lm(
                ref.model_path, ref.trainer_config.torch_dtype, ref.trust_remote_code, "reference"
            )
            model = apply_kernels(model, ref.trainer_config.kernels, device, "reference").to(device)
            packed = choose_packing(model, t.pack_sequences, name, cfg.source)
            ds = _deepspeed(ref.trainer_config, t, device, groups.get(name), trained=False)
            if ds is None:
                roles[name] = ReferenceRole(
                    model,
                    pad_id,
                    t.infer_micro_bs,
                    offload=offload,
                    packed=packed,
                    logit_chunk_tokens=t.logit_chunk_tokens,
                )
            else:
                from rlhf_pipe.zero import ZeroReferenceRole

                roles[name] = ZeroReferenceRole(
                    model,
                    pad_id,
                    t.infer_micro_bs,
                    ds_config=ds,
                    dp_group=groups.get(name),
                    packed=packed,
                )
        elif name == Role.REWARD:
            scorers = build_scorers(mc.reward, cfg.plan.reward_scorers, device)
            packed_scorers = {
                sc.name
                for sc in scorers
                if sc.kind == "model"
                and choose_packing(
                    sc.impl, t.pack_sequences, f"reward scorer {sc.name}", cfg.source
                )
            }
            ds = _deepspeed(mc.reward.trainer_config, t, device, groups.get(name), trained=False)
            if ds is None:
                roles[name] = RewardRole(scorers, pad_id, t.infer_micro_bs, offload, packed_scorers)
            else:
                from rlhf_pipe.zero import ZeroRewardRole

                roles[name] = ZeroRewardRole(
                    scorers,
                    pad_id,
                    t.infer_micro_bs,
                    ds_config=ds,
                    dp_group=groups.get(name),
                    packed_scorers=packed_scorers,
                )
            if reward_fn is not None:
                roles[name].set_function(reward_fn)
    return roles


def _deepspeed(tc, t, device, dp_group, trained: bool) -> dict | None:
    """The DeepSpeed engine config of a role, or None without a deepspeed_config."""
    if not tc.deepspeed_config:
        return None
    import torch.distributed as dist

    from rlhf_pipe import zero

    zero.ensure_process_group(torch.device(device))
    dp = dist.get_world_size(group=dp_group) if dp_group is not None else 1
    return zero.engine_config(tc.deepspeed_config, tc, t.train_micro_bs, dp, trained)


def _trained_role(plain_cls, zero_cls: str, model, pad_id, tc, sizes, device, dp_group, **extra):
    """`extra`: the role class's own arguments (packed, lora_sync)."""
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    kw = dict(
        lr=tc.lr,
        betas=tc.betas,
        eps=tc.eps,
        weight_decay=tc.weight_decay,
        warmup_steps=tc.lr_warmup_steps,
        max_grad_norm=tc.max_grad_norm,
        dp_group=dp_group,
        **sizes,
        **extra,
    )
    ds = _deepspeed(tc, SimpleNamespace(**sizes), device, dp_group, trained=True)
    if ds is None:
        return plain_cls(model, pad_id, **kw)
    from rlhf_pipe import zero

    return getattr(zero, zero_cls)(model, pad_id, ds_config=ds, **kw)


def build_scorers(rw: ModelConfig, scorers: dict, device) -> list[Scorer]:
    """The reward's scorers: `scorers` is the run plan's {name: RewardScorerConfig}
    (validation.reward_scorers), `rw` the reward section they came from."""
    from rlhf_pipe.rewards.http import HTTPRewardModel

    out = []
    for name, sc in scorers.items():
        if sc.model_path:
            what = "reward" if name == "model" and rw.scorers is None else f"reward scorer {name}"
            model = load_value_model(
                sc.model_path, rw.trainer_config.torch_dtype, sc.trust_remote_code, what
            )
            model = apply_kernels(model, rw.trainer_config.kernels, device, "reward").to(device)
            out.append(Scorer(name, sc.weight, "model", model))
        elif sc.url:
            out.append(
                Scorer(
                    name,
                    sc.weight,
                    "remote",
                    HTTPRewardModel(
                        name,
                        sc.url,
                        batch_size=sc.batch_size,
                        timeout_s=sc.timeout_s,
                        max_retries=sc.max_retries,
                        backoff_s=sc.backoff_s,
                        token_env=sc.token_env,
                    ),
                )
            )
        else:
            out.append(Scorer(name, sc.weight, "function", resolve_function(sc.reward_fn)))
    return out


def build_vllm_engine(
    cfg: RunConfig,
    engine_index: int = 0,
    in_process: bool = True,
    weight_receiver: bool = False,
    visible_devices: str | None = None,
):
    from rlhf_pipe.rollout.vllm_engine import VLLMEngine

    r, gen = cfg.rollout_config, cfg.plan.generator
    return VLLMEngine(
        cfg.model_configs.policy.model_path,
        dtype=r.dtype,
        seed=r.seed,
        max_model_len=r.max_model_len,
        tensor_parallel_size=gen.parallel.tensor.get("size", 1),
        gpu_memory_utilization=r.gpu_memory_utilization,
        enforce_eager=r.enforce_eager,
        engine_kwargs=r.engine_kwargs,
        pause_gc=r.pause_gc,
        engine_index=engine_index,
        in_process=in_process,
        weight_receiver=weight_receiver,
        visible_devices=visible_devices,
        lora=lora.engine_lora(cfg.plan),
    )


def build_engine(cfg: RunConfig, actor, tokenizer, in_process: bool = True):
    """The generation engine: an HF copy of the actor beside it, or vLLM."""
    if cfg.plan.generator.generator_type == "hf":
        from rlhf_pipe.rollout.hf_engine import HFEngine

        actor_model = actor.model  # the hf engine lives beside the actor (placement)
        # A LoRA actor's copy is merged: this engine then loads merged weights by HF name.
        model = (
            lora.merged_copy(actor_model)
            if lora.has_lora(actor_model)
            else copy.deepcopy(actor_model)
        )
        return HFEngine(
            model,
            tokenizer.pad_token_id,
            tokenizer.eos_token_id,
            chunk_size=cfg.train_config.infer_micro_bs,
            pause_gc=cfg.rollout_config.pause_gc,
        )
    return build_vllm_engine(cfg, 0, in_process)


def build_tokenizer(cfg: RunConfig):
    """The policy's tokenizer, checked against the policy model."""
    policy, tc = cfg.model_configs.policy, cfg.tokenizer_config
    tok_path = tc.tokenizer_path or policy.model_path
    tokenizer = load_tokenizer(tok_path, tc.trust_remote_code)
    check_tokenizer_matches(policy.model_path, tok_path, "policy", tc.trust_remote_code, tokenizer)
    return tokenizer


def build_prompt_source(cfg: RunConfig, tokenizer) -> PromptSource:
    pd = cfg.prompt_dataset_config
    return PromptSource(
        [parse_dataset_spec(s, cfg.constants) for s in pd.message_datasets],
        tokenizer,
        pd.samples_each_epoch,
        pd.max_len,
        pd.prompt_key,
        pd.shuffle,
        pd.seed,
        min_len=cfg.plan.generator.batch_generation.min_prompt_length,
    )


def build_text_prompt_source(
    prompts: list[str], pd: PromptDatasetConfig, tokenizer, min_len: int
) -> PromptSource:
    """A prompt source over these prompt texts (rendered with the chat template when there is
    one), drawn with prompt_dataset_config's sizes: the trainer's set_prompts."""
    if not prompts:
        raise ValueError("set_prompts: the list is empty")
    path = Path(tempfile.mkdtemp(prefix="rlhf_pipe_prompts_")) / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return PromptSource(
        [parse_dataset_spec(str(path))],
        tokenizer,
        pd.samples_each_epoch,
        pd.max_len,
        "prompt",
        pd.shuffle,
        pd.seed,
        min_len=min_len,
    )


def build_eval_source(cfg: RunConfig, tokenizer) -> PromptSource | None:
    ed = cfg.eval_dataset_config
    if ed is None:
        return None
    return PromptSource(
        [parse_dataset_spec(s, cfg.constants) for s in ed.message_datasets],
        tokenizer,
        ed.samples_each_epoch,
        ed.max_len,
        ed.prompt_key,
        False,
        ed.seed,
    )
