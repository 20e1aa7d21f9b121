"""Fused kernels for a loaded HF model: `trainer_config.kernels` of a model_configs entry.

On one H200 the actor's train call at the Qwen2-0.5B shape is launch-bound: unfused
elementwise kernels (casts, RMSNorm, SwiGLU, rotary) dominate and the GPU idles 43% of a chunk
(BENCHMARKS.md, "the kernels of Train"). Two ways to fuse them, chosen per model:

- 'liger': liger-kernel's Triton RMSNorm, SwiGLU MLP and rotary embedding, put on this model
  instance by liger's own instance-level entry point. Its fused linear cross entropy stays off:
  the head is rlhf_pipe.ppo.fused_head's. Triton on a CUDA GPU only. Scope: the norm and MLP
  forwards are bound to this instance (the classes liger also swaps into transformers' modeling
  module are put back, so a model loaded later is not changed by load order); the rotary
  embedding is the module-level function `apply_rotary_pos_emb` of that modeling module, so
  every model of the same architecture in the process runs liger's rotary from then on.
- 'compile': each decoder layer through torch.compile (inductor) with dynamic shapes, so chunks
  of other lengths reuse the graph. `nn.Module.compile` keeps parameter names and state_dict as
  they are (checkpoints, weight sync and LoRA see the plain model). All layers share one graph
  per variant: grad or no grad, attention mask or none (an unpadded batch). CPU or GPU.
  Inductor's mix-order reduction is off for these layers (COMPILE_OPTIONS).

Applied to the loaded model before it moves to its device, LoRA and gradient checkpointing
(rlhf_pipe.builders).
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from rlhf_pipe.errors import ConfigError

logger = logging.getLogger(__name__)

KERNELS = ("liger", "compile")

# Inductor's mix-order reduction (the two reductions of a norm's backward in one kernel) guards
# on the chunk's token count (>= 4096 rows, rows x hidden >= 5 Mi), so chunks either side of
# those sizes compile again. One H200, train call of 8 x 539 tokens, compiled with it / without
# it: 1.8B shape 104.8 / 100.4 ms and 3 / 1 train graphs for chunks of 4312, 3288 and 2264
# tokens; 0.5B 94.9 / 94.3 ms, 1 / 1 graph. (A GPU pass: the CPU backend never fuses so.)
COMPILE_OPTIONS = {"triton.mix_order_reduction": False}


def apply_kernels(model: nn.Module, kernels: str | None, device, role: str) -> nn.Module:
    """`model` with `kernels` applied in place (None: as it is). `device`: where the model will
    run; `role`: its model_configs entry ('policy', ...), named in errors."""
    key = f"model_configs.{role}.trainer_config.kernels"
    if kernels == "liger":
        _apply_liger(model, torch.device(device), key)
        logger.info("%s: liger-kernel %s", role, liger_modules(model))
    elif kernels == "compile":
        from torch._inductor import config

        # a torch without that pass (older ones) would refuse the key
        options = COMPILE_OPTIONS if hasattr(config.triton, "mix_order_reduction") else None
        layers = decoder_layers(model, key)
        for layer in layers:
            layer.compile(dynamic=True, options=options)
        logger.info("%s: %d decoder layers compiled (torch.compile, dynamic)", role, len(layers))
    elif kernels is not None:
        raise ConfigError(f"{key}: expected one of {KERNELS} or None, got {kernels!r}")
    return model


def decoder_layers(model: nn.Module, key: str) -> nn.ModuleList:
    """The transformer blocks of an HF model (`model.<base_model_prefix>.layers`)."""
    layers = getattr(_trunk(model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"{key}: no decoder layers found in {type(model).__name__} "
            f"(expected {model.base_model_prefix}.layers)"
        )
    return layers


def _trunk(model: nn.Module) -> nn.Module:
    return getattr(model, str(model.base_model_prefix), model)


def _apply_liger(model: nn.Module, device: torch.device, key: str) -> None:
    if device.type != "cuda":
        raise ConfigError(
            f"{key}: 'liger' runs Triton kernels on a CUDA GPU, but this model runs on "
            f"{device.type} (use 'compile' or None)"
        )
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as e:
        raise ConfigError(
            f"{key}: 'liger' needs liger-kernel (pip install 'rlhf_pipe[liger]'): {e}"
        ) from None
    modeling = sys.modules[type(_trunk(model)).__module__]
    classes = {k: v for k, v in vars(modeling).items() if isinstance(v, type)}
    _apply_liger_kernel_to_instance(
        model,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
    for name, cls in classes.items():  # the classes back: later models are built as before
        setattr(modeling, name, cls)
    if not liger_modules(model):  # liger only logs an architecture it does not know
        raise ConfigError(
            f"{key}: liger-kernel has no kernels for model type "
            f"{getattr(model.config, 'model_type', None)!r}"
        )


def liger_modules(model: nn.Module) -> dict[str, int]:
    """{liger module name: count} of the modules liger patched ('LigerRMSNorm', ...)."""
    out: dict[str, int] = {}
    for m in model.modules():
        name = m._get_name()
        if name.startswith("Liger"):
            out[name] = out.get(name, 0) + 1
    return out
