"""LoRA for the actor and the critic through peft, and the two ways its weights reach vLLM.

The adapter is injected into the HF model in place (`peft.inject_adapter_in_model`), so the
roles keep calling a plain transformers model: same forward, same `score` head, and no
PeftModel wrapper between them. Only the adapter trains (and a critic's value head, which is
new); every base weight has requires_grad False and stays bit for bit as loaded.

Weight sync to vLLM, `generator_config.lora_sync`:
    merged   W + (alpha / r) * B @ A for each adapted linear, under the base model's HF names;
             any engine loads it as ordinary new weights.
    adapter  only the lora_A / lora_B tensors, in peft's file layout; the engine writes them
             to /dev/shm and serves them as a vLLM LoRARequest (`VLLMEngine(lora=...)`).
    auto     merged, the faster on the CPU at every size measured (see `sync_mode`).

Checkpoints: `actor/` stays a plain HF folder of merged weights (export and serving need no
peft) and `actor/adapter/` holds the adapter, which is what resume loads: the base comes from
model_path again, unchanged, so resume is exact.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
from torch import nn

from rlhf_pipe.errors import ConfigError

ADAPTER = "default"  # peft's adapter name
FILE_PREFIX = "base_model.model."  # peft's save_pretrained prefix; vLLM strips it
ADAPTER_DIR = "adapter"  # checkpoint subfolder
HEAD_NAMES = ("score", "v_head", "value_head", "classifier")  # a critic's new value head


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "rlhf_lora", None) is not None


def peft_config(peft_kwargs: dict):
    """peft's LoraConfig from `cfg.plan.lora[role].peft_kwargs()` (r, lora_alpha, lora_dropout,
    target_modules; rlhf_pipe.config.LoraSettings)."""
    from peft import LoraConfig

    return LoraConfig(**peft_kwargs, bias="none")


def apply_lora(model: nn.Module, peft_kwargs: dict, src: str, role: str) -> nn.Module:
    """Inject a fresh adapter (B = 0, so the model's outputs are unchanged) and freeze the
    base. A lora_layer that matches nothing is a config error naming the key: checked here,
    not when the config loads, because only the loaded model knows its module names."""
    from peft import inject_adapter_in_model

    config = peft_config(peft_kwargs)
    # A critic's value head is new: it trains in full, not through an adapter.
    config.exclude_modules = [
        h for h in HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)
    ] or None
    try:
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(
            f"{src}: model_configs.{role}.trainer_config.lora_layer: "
            f"{' '.join(str(e).split())[:300]}"
        ) from None
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name.split(".")[0] in HEAD_NAMES)
    model.rlhf_lora = config
    return model


def trainable_weights(model: nn.Module) -> dict:
    """The adapter (and value head) tensors under the injected model's names."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def adapter_tensors(model: nn.Module) -> dict:
    """The adapter in peft's file layout ('base_model.model.<module>.lora_A.weight'), which is
    what vLLM's LoRA loader and peft's from_pretrained read."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {FILE_PREFIX + k: v.detach() for k, v in state.items()}


def merged_tensors(model: nn.Module) -> dict:
    """Every weight under the base model's HF names, adapted linears merged (no dropout)."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                deltas[f"{name}.base_layer.weight"] = module.get_delta_weight(ADAPTER)
        out = {}
        for name, t in model.state_dict().items():
            if ".lora_" in name:
                continue
            t = t + deltas[name] if name in deltas else t
            out[name.replace(".base_layer.", ".")] = t.detach()
    return out


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of `model` with the adapter merged (for the transformers rollout engine,
    which loads merged weights by HF name)."""
    from peft.tuners.lora import LoraLayer

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            with torch.no_grad():
                base.weight += module.get_delta_weight(ADAPTER)
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, base)
    out.rlhf_lora = None
    return out.requires_grad_(False)


def save_adapter(model: nn.Module, out_dir: str | Path) -> None:
    """adapter_config.json + adapter_model.safetensors: peft's layout, loadable by
    `PeftModel.from_pretrained` and by vLLM. A critic's value head is saved beside it."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_adapter_config(model.rlhf_lora.to_dict(), out)
    save_file(
        {k: v.contiguous().cpu() for k, v in adapter_tensors(model).items()},
        str(out / "adapter_model.safetensors"),
    )
    head = {n: t for n, t in trainable_weights(model).items() if ".lora_" not in n}
    if head:
        save_file({k: v.contiguous().cpu() for k, v in head.items()}, str(out / "head.safetensors"))


def write_adapter_config(config: dict, out_dir: Path) -> None:
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))


def load_adapter(model: nn.Module, folder: str | Path) -> None:
    """Load what `save_adapter` wrote, strictly: every trainable tensor must be there."""
    from safetensors.torch import load_file

    from rlhf_pipe.checkpoint import CheckpointError

    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").exists():
        raise CheckpointError(
            f"{folder}: no LoRA adapter (adapter_model.safetensors); was "
            f"this checkpoint written with enable_lora?"
        )
    # File names -> injected names: drop peft's prefix, put the adapter name back.
    weights = {
        k[len(FILE_PREFIX) : -len(".weight")] + f".{ADAPTER}.weight": v
        for k, v in load_file(str(folder / "adapter_model.safetensors")).items()
    }
    if (folder / "head.safetensors").exists():
        weights.update(load_file(str(folder / "head.safetensors")))
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != wanted:
        raise CheckpointError(
            f"{folder}: adapter does not match the model (missing "
            f"{sorted(wanted - set(weights))[:3]}, unexpected "
            f"{sorted(set(weights) - wanted)[:3]})"
        )
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t)


@contextlib.contextmanager
def dropout_active(model: nn.Module):
    """LoRA dropout on for a Train-stage pass: the models otherwise run in eval mode, so the
    Forward stage's log-probs stay deterministic."""
    layers = (
        [
            m
            for n, m in model.named_modules()
            if n.endswith(f"lora_dropout.{ADAPTER}") and isinstance(m, nn.Dropout)
        ]
        if has_lora(model)
        else []
    )
    for m in layers:
        m.train()
    try:
        yield
    finally:
        for m in layers:
            m.eval()


def engine_lora(plan) -> dict | None:
    """The adapter config a vLLM engine needs in 'adapter' mode (None otherwise)."""
    if plan.lora_sync != "adapter":
        return None
    return peft_config(plan.lora["policy"].peft_kwargs()).to_dict()
