"""Build the tiny default assets once and cache them outside git.

Everything is made in code from fixed seeds: a byte-level BPE tokenizer trained on a synthetic
corpus, a Llama-architecture policy (also the reference), a critic initialised from the policy
trunk and a separately initialised reward model (both `*ForSequenceClassification` with one
label, so they are plain HF folders), and a JSONL prompt set for a verifiable task:

    prompt:  "Write digits: 3 7 1 =>"
    reward:  fraction of the answer's non-space characters that are digits (`digit_reward`).

A random policy scores low on it and PPO raises it within a few dozen steps on a CPU.
The cache key is ASSETS_VERSION plus the shape settings, so changing either rebuilds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

ASSETS_VERSION = "v1"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = (
    "alpha beta gamma delta river stone cloud green swift quiet orange window silver "
    "market garden yellow simple number letter write digits count answer please"
).split()


@dataclass(frozen=True)
class TinyAssets:
    root: Path
    policy: Path  # LlamaForCausalLM + tokenizer; also used as the reference
    critic: Path  # LlamaForSequenceClassification(num_labels=1), trunk copied from policy
    reward: Path  # LlamaForSequenceClassification(num_labels=1), its own random init
    prompts: Path  # JSONL, {"prompt": ...} per line
    eval_prompts: Path


def default_cache_dir() -> Path:
    base = os.environ.get("RLHF_PIPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rlhf_pipe"
    )
    return Path(base)


def digit_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Verifiable reward of the tiny task: share of non-space answer characters that are digits."""
    scores = []
    for text in responses:
        chars = [c for c in text if not c.isspace()]
        scores.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return scores


def replay_best_answers(episode_relay_buffers) -> list[dict]:
    """relay_sample_fn of examples/rlhf/tiny_relay_cpu.py: the 4 best-scored answers of the
    kept past episodes (ties: older first), replayed into the current step."""
    pool = [d for episode in episode_relay_buffers for d in episode.buffer]
    pool.sort(key=lambda d: (-d["score"], d["episode_id"], d["sample_id"]))
    return pool[:4]


def _prompt_text(rng: random.Random) -> str:
    digits = " ".join(str(rng.randrange(10)) for _ in range(rng.randint(2, 5)))
    return f"{rng.choice(WORDS)} write digits: {digits} =>"


def _corpus(rng: random.Random, n_lines: int = 4000) -> list[str]:
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
        nums = [str(rng.randrange(1000)) for _ in range(rng.randint(0, 4))]
        mixed = words + nums
        rng.shuffle(mixed)
        lines.append(" ".join(mixed))
    return lines


def _build_tokenizer(out: Path, vocab_size: int, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(seed)), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.padding_side = "left"
    fast.save_pretrained(out)


def _llama_config(vocab_size: int, hidden: int, layers: int, heads: int, max_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_len,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def _save_model(model, tokenizer_dir: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


def _write_prompts(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": _prompt_text(rng)}) + "\n")


def build_tiny_assets(
    cache_dir: str | Path | None = None,
    *,
    vocab_size: int = 512,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    max_len: int = 256,
    seed: int = 0,
) -> TinyAssets:
    """Return the tiny assets, building them on first use (a few seconds on a CPU)."""
    key = f"tiny-{ASSETS_VERSION}-v{vocab_size}-h{hidden}-l{layers}-a{heads}-s{seed}"
    root = Path(cache_dir or default_cache_dir()) / key
    assets = TinyAssets(
        root,
        root / "policy",
        root / "critic",
        root / "reward",
        root / "prompts.jsonl",
        root / "eval_prompts.jsonl",
    )
    if (root / "COMPLETE").exists():
        return assets

    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    root.parent.mkdir(parents=True, exist_ok=True)
    # Built in a temp folder and renamed, so concurrent test workers never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=key + ".", dir=root.parent))
    try:
        tok_dir = tmp / "tokenizer"
        _build_tokenizer(tok_dir, vocab_size, seed)
        cfg = _llama_config(vocab_size, hidden, layers, heads, max_len)

        torch.manual_seed(seed)
        policy = LlamaForCausalLM(cfg)
        _save_model(policy, tok_dir, tmp / "policy")

        torch.manual_seed(seed + 1)
        critic_cfg = _llama_config(vocab_size, hidden, layers, heads, max_len)
        critic_cfg.num_labels = 1
        critic = LlamaForSequenceClassification(critic_cfg)
        critic.model.load_state_dict(policy.model.state_dict())
        _save_model(critic, tok_dir, tmp / "critic")

        torch.manual_seed(seed + 2)
        reward = LlamaForSequenceClassification(critic_cfg)
        _save_model(reward, tok_dir, tmp / "reward")

        _write_prompts(tmp / "prompts.jsonl", 512, seed)
        _write_prompts(tmp / "eval_prompts.jsonl", 64, seed + 1000)
        shutil.rmtree(tok_dir)
        (tmp / "COMPLETE").write_text(key + "\n")
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "COMPLETE").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return assets


if __name__ == "__main__":
    print(build_tiny_assets())
