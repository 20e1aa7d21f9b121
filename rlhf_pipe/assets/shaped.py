"""Random-weight models of real shapes, for timing on GPUs (no model hub).

`build_shaped_assets("qwen2-0.5b")` writes a policy (Qwen2ForCausalLM with Qwen2-0.5B's
shape: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936), a critic and a
reward model (Qwen2ForSequenceClassification, critic trunk copied from the policy), with the
tiny BPE tokenizer (its 512 ids fit in the larger vocabulary; ids past 512 decode to nothing,
which is fine for timing). Prompts are the tiny task's. Cached like the tiny assets.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rlhf_pipe.assets.tiny import TinyAssets, build_tiny_assets, default_cache_dir

SHAPES = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True),
}


def build_shaped_assets(shape: str = "qwen2-0.5b", cache_dir: str | Path | None = None,
                        dtype: str = "bfloat16", seed: int = 0) -> TinyAssets:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    tiny = build_tiny_assets(cache_dir)
    root = Path(cache_dir or default_cache_dir()) / f"shaped-{shape}-{dtype}-s{seed}"
    assets = TinyAssets(root, root / "policy", root / "critic", root / "reward", tiny.prompts,
                        tiny.eval_prompts)
    if (root / "COMPLETE").exists():
        return assets
    import torch
    from transformers import (AutoTokenizer, Qwen2Config, Qwen2ForCausalLM,
                              Qwen2ForSequenceClassification)

    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, torch_dtype=dtype)
    tok = AutoTokenizer.from_pretrained(tiny.policy)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        torch.manual_seed(seed)
        policy = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
        policy.save_pretrained(tmp / "policy")
        cls_cfg = Qwen2Config(**{**cfg.to_dict(), "num_labels": 1})
        for name, trunk in (("critic", policy.model), ("reward", None)):
            torch.manual_seed(seed + 1 + len(name))
            model = Qwen2ForSequenceClassification(cls_cfg).to(getattr(torch, dtype))
            if trunk is not None:
                model.model.load_state_dict(trunk.state_dict())
            model.save_pretrained(tmp / name)
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
