"""Random-weight models of real shapes, for timing on GPUs (no model hub).

`build_shaped_assets(shape)` writes a policy (a causal LM of that shape), a critic and a reward
model (sequence classifiers; the critic's trunk is copied from the policy), with the tiny BPE
tokenizer (its 512 ids fit in the larger vocabulary; ids past 512 decode to nothing, which is
fine for timing). Prompts are the tiny task's. Cached like the tiny assets.

    qwen2-0.5b      Qwen2: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936
    internlm2-1.8b  InternLM2-1.8B's shape (hidden 2048, 24 layers, 16 heads, 8 KV heads,
                    MLP 8192, vocab 92544, untied head) as a Llama model: InternLM2 is Llama
                    with a fused QKV weight, so the kernels and FLOPs are the same, and vLLM
                    and transformers run it without remote code.

Weights are drawn on the GPU when there is one: a 1.8B model's init takes minutes on a CPU.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rlhf_pipe.assets.tiny import TinyAssets, build_tiny_assets, default_cache_dir

SHAPES = {
    "qwen2-0.5b": (
        "qwen2",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
    ),
    "internlm2-1.8b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=8,
            vocab_size=92544,
            tie_word_embeddings=False,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
        ),
    ),
}


def shape_classes(arch: str):
    """(config, causal LM, sequence classifier) classes of an architecture in SHAPES."""
    import transformers as tf

    prefix = {"qwen2": "Qwen2", "llama": "Llama"}[arch]
    return (
        getattr(tf, f"{prefix}Config"),
        getattr(tf, f"{prefix}ForCausalLM"),
        getattr(tf, f"{prefix}ForSequenceClassification"),
    )


def shape_config(shape: str, dtype: str = "bfloat16"):
    arch, dims = SHAPES[shape]
    config_cls = shape_classes(arch)[0]
    return config_cls(
        **dims,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype=dtype,
    )


def build_shaped_assets(
    shape: str = "qwen2-0.5b",
    cache_dir: str | Path | None = None,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> TinyAssets:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    tiny = build_tiny_assets(cache_dir)
    root = Path(cache_dir or default_cache_dir()) / f"shaped-{shape}-{dtype}-s{seed}"
    assets = TinyAssets(
        root, root / "policy", root / "critic", root / "reward", tiny.prompts, tiny.eval_prompts
    )
    if (root / "COMPLETE").exists():
        return assets
    import torch
    from transformers import AutoTokenizer

    config_cls, causal_cls, classifier_cls = shape_classes(SHAPES[shape][0])
    cfg = shape_config(shape, dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(tiny.policy)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            policy = causal_cls(cfg).to(getattr(torch, dtype))
        policy.save_pretrained(tmp / "policy")
        cls_cfg = config_cls(**{**cfg.to_dict(), "num_labels": 1})
        for name, trunk in (("critic", policy.model), ("reward", None)):
            torch.manual_seed(seed + 1 + len(name))
            with torch.device(device):
                model = classifier_cls(cls_cfg).to(getattr(torch, dtype))
            if trunk is not None:
                model.model.load_state_dict(trunk.state_dict())
            model.save_pretrained(tmp / name)
            del model
        for name in ("policy", "critic", "reward"):
            tok.save_pretrained(tmp / name)
        (tmp / "COMPLETE").write_text(shape + "\n")
        try:
            os.rename(tmp, root)
        except OSError:  # torchrun ranks build it at once; losing the race is fine
            if not (root / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return assets


if __name__ == "__main__":
    import sys

    print(build_shaped_assets(*(sys.argv[1:2] or ["qwen2-0.5b"])))
