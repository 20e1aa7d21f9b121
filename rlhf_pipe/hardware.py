"""What a GPU can do, measured, and how close each role and stage comes to it.

Model FLOPs utilisation (MFU) follows the usual convention: a training pass over T tokens of a
model of P parameters costs 6 P T (forward 2 P T, backward 4 P T), a forward pass 2 P T, both
counted on real tokens (padding and recomputation are the implementation's own cost). The
floors are what the hardware allows at best: training at the measured bf16 matmul rate, and
decoding one token per sequence per step with every weight read from HBM once a step and each
sequence's KV cache read once a step (its context grows by one token a step).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

TRAIN_FLOPS_PER_PARAM_TOKEN = 6
FORWARD_FLOPS_PER_PARAM_TOKEN = 2


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float | None:
    """Sustained bf16 matmul rate of `device` in TFLOP/s (None on a CPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)  # host sync: timing
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def hbm_gbps(device: torch.device, nbytes: int = 2**31, iters: int = 10) -> float | None:
    """Device-memory bandwidth in GB/s from a copy (each byte read once and written once)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)  # host sync: timing
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * nbytes * iters / (time.perf_counter() - start) / 1e9


def model_params(model_path: str, value_head: bool = False) -> int | None:
    """Parameter count from an HF folder's config.json (None when it cannot be read)."""
    from rlhf_pipe.placement import params_from_hf_config

    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
        return params_from_hf_config(config, value_head=value_head)
    except (OSError, ValueError, KeyError):
        return None


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """Bytes of one token's keys and values over every layer of a Llama-style decoder."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def model_kv_bytes_per_token(model_path: str, dtype_bytes: int) -> int | None:
    """kv_bytes_per_token of an HF folder's config.json (None when it cannot be read)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
        return kv_bytes_per_token(config, dtype_bytes)
    except (OSError, ValueError, KeyError):
        return None


def decode_kv_reads(sequences: int, prompt_len: float, response_len: float) -> float:
    """Tokens of KV cache read over a generation: each of `sequences` reads its context at every
    one of its decode steps, prompt_len + t at step t. With the mean lengths this is at most the
    true sum (lengths that spread read more), so the floor stays a floor."""
    return sequences * (response_len * prompt_len + response_len * (response_len - 1) / 2)


def role_utilisation(
    role_busy_s: dict[str, float],
    params: dict[str, int],
    sequence_tokens: float,
    peak_tflops: float | None,
) -> dict[str, dict[str, float]]:
    """{'actor.train': {'tflops': .., 'mfu': ..}, ...} for each timed role call.

    role_busy_s: busy seconds per role row ('actor.train', 'critic.forward', ...) of one step;
    params: parameters per role; sequence_tokens: prompt + response tokens of the step.
    """
    out = {}
    for row, seconds in role_busy_s.items():
        role, _, call = row.partition(".")
        if call not in ("train", "forward") or role not in params or seconds <= 0:
            continue
        per = TRAIN_FLOPS_PER_PARAM_TOKEN if call == "train" else FORWARD_FLOPS_PER_PARAM_TOKEN
        tflops = per * params[role] * sequence_tokens / seconds / 1e12
        out[row] = {"tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None}
    return out


def stage_floors(
    trained_params: int,
    policy_weight_bytes: int,
    sequence_tokens: float,
    decode_steps: float,
    peak_tflops: float | None,
    hbm: float | None,
    kv_bytes_read: float = 0.0,
) -> dict[str, float | None]:
    """Seconds a step's train and generate stages need at least on this hardware.
    `kv_bytes_read`: the KV cache the generation reads in all (decode_kv_reads x bytes)."""
    train = (
        TRAIN_FLOPS_PER_PARAM_TOKEN * trained_params * sequence_tokens / (peak_tflops * 1e12)
        if peak_tflops
        else None
    )
    generate = (decode_steps * policy_weight_bytes + kv_bytes_read) / (hbm * 1e9) if hbm else None
    return {"train_floor_s": train, "generate_floor_s": generate}
