"""Loading the four models from local HF folders and running them on padded batches.

Actor and reference are `AutoModelForCausalLM`. Critic and reward are
`AutoModelForSequenceClassification` with one label: a causal-LM trunk plus a scalar head, a
plain HF folder both ways. A critic may be started from a causal-LM folder (the head is then
freshly initialised). Models run with dropout off (eval mode) in every stage, so the log-probs
of the Forward stage are those the Train stage recomputes.

Notation: b = samples, P = prompt width, R = response width, V = vocab.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from rlhf_pipe.pipeline.batch import PackedBatch, PaddedBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    pass


def _check_folder(path: str, role: str) -> None:
    if not os.path.isdir(path):
        raise ModelLoadError(f"{role}: model folder not found: {path}")
    names = os.listdir(path)
    if not any(
        n.endswith((".safetensors", ".bin")) or n.endswith(".safetensors.index.json") for n in names
    ):
        raise ModelLoadError(f"{role}: no weights (*.safetensors or *.bin) in {path}")


def check_tokenizer_matches(
    model_path: str,
    tokenizer_path: str,
    role: str = "policy",
    trust_remote_code: bool = False,
    tokenizer=None,
) -> None:
    """Fail in one line if the tokenizer has ids the model's embedding has no row for.

    A model vocabulary larger than the tokenizer is fine (vocabularies are padded)."""
    from transformers import AutoConfig

    _check_folder(model_path, role)
    if not os.path.isdir(tokenizer_path):
        raise ModelLoadError(f"{role}: tokenizer folder not found: {tokenizer_path}")
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{role}: cannot read the model config in {model_path}: "
            f"{type(e).__name__}: {' '.join(str(e).split())}"
        ) from None
    try:
        # An already loaded tokenizer is measured as it is, not loaded twice.
        tokens = len(
            tokenizer
            if tokenizer is not None
            else load_tokenizer(tokenizer_path, trust_remote_code)
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{role}: cannot load the tokenizer in {tokenizer_path}: "
            f"{type(e).__name__}: {' '.join(str(e).split())}"
        ) from None
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and tokens > vocab:
        raise ModelLoadError(
            f"{role}: the tokenizer in {tokenizer_path} has {tokens} tokens but "
            f"the model in {model_path} has a vocabulary of {vocab} "
            f"(vocab_size in config.json)"
        )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path: str, dtype: str = "float32", trust_remote_code: bool = False, role: str = "policy"
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    _check_folder(path, role)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    return model.eval()


def load_value_model(
    path: str, dtype: str = "float32", trust_remote_code: bool = False, role: str = "critic"
) -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    _check_folder(path, role)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a fresh value head on a causal-LM folder is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    _value_head(model)  # fail early if the architecture has no scalar head we know
    return model.eval()


def _trunk(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def _value_head(model: nn.Module) -> nn.Module:
    for name in ("score", "v_head", "value_head", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ModelLoadError(f"{type(model).__name__}: no scalar value head found")


def response_logits(model: nn.Module, batch: PaddedBatch | PackedBatch) -> Tensor:
    """Logits that predict each response token: (b, R, V) padded, (N, V) packed. Either way
    `batch.labels` has the matching shape and `batch.rows` turns per-token results to (b, R)."""
    if isinstance(batch, PackedBatch):
        out = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            logits_to_keep=batch.predict_index,
            use_cache=False,
        )
        return out.logits[0]
    R = batch.response_width
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=R + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]  # position t predicts token t + 1


# Causal LMs whose logits are exactly `get_output_embeddings()(last_hidden_state)`: no logit
# scaling or soft-capping after the head (Gemma 2 and Cohere have one), so the fused head path
# (rlhf_pipe.ppo.fused_head) computes the same log-probs.
_PLAIN_HEAD_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def fused_head_supported(model: nn.Module) -> bool:
    """Whether `response_logprobs` can skip the full logits for this model. Not under ZeRO-3,
    whose partitioned head weight is only gathered inside the module's own forward."""
    inner = _unwrapped(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return (
        isinstance(head, nn.Linear)
        and getattr(inner.config, "model_type", None) in _PLAIN_HEAD_MODEL_TYPES
        and not hasattr(head.weight, "ds_id")
    )


def response_logprobs(
    model: nn.Module,
    batch: PaddedBatch | PackedBatch,
    chunk_rows: int = 0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(b, R) log-probs of the response tokens, and their (b, R) entropy (detached) or None.

    chunk_rows > 0 and a model `fused_head_supported` allows: the head runs on the real
    response tokens only, `chunk_rows` at a time, and the (tokens, V) logits are never held
    whole (rlhf_pipe.ppo.fused_head). Otherwise: the full logits, as `response_logits`. Padding
    positions hold 0 on the fused path and arbitrary values on the plain one; callers mask.
    """
    from rlhf_pipe.ppo import core
    from rlhf_pipe.ppo.fused_head import linear_logprobs

    if not chunk_rows or not fused_head_supported(model):
        logits = response_logits(model, batch)
        logp = batch.rows(core.logprobs_from_logits(logits, batch.labels))
        if not with_entropy:
            return logp, None
        with torch.no_grad():
            return logp, batch.rows(core.entropy_from_logits(logits))
    inner = _unwrapped(model)
    hidden = _trunk(inner)(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    head = inner.get_output_embeddings()
    if isinstance(batch, PackedBatch):
        logp, entropy = linear_logprobs(
            hidden[0, batch.predict_index],
            head.weight,
            batch.labels,
            chunk_rows,
            head.bias,
            with_entropy,
        )
        return batch.rows(logp), (batch.rows(entropy) if with_entropy else None)
    P, R = batch.prompt_width, batch.response_width
    real = batch.response_mask.bool()  # (b, R): the head never sees padding tokens
    logp, entropy = linear_logprobs(
        hidden[:, P - 1 : P - 1 + R][real],
        head.weight,
        batch.labels[real],
        chunk_rows,
        head.bias,
        with_entropy,
    )
    out = logp.new_zeros(real.shape).masked_scatter(real, logp)
    if not with_entropy:
        return out, None
    return out, entropy.new_zeros(real.shape).masked_scatter(real, entropy)


def _hidden(model: nn.Module, batch: PaddedBatch | PackedBatch) -> Tensor:
    return _trunk(model)(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state


def token_values(model: nn.Module, batch: PaddedBatch | PackedBatch) -> Tensor:
    """Critic value of the state before each response token: (b, R)."""
    hidden = _hidden(model, batch)
    if isinstance(batch, PackedBatch):
        return batch.rows(_value_head(model)(hidden[0, batch.predict_index]).squeeze(-1).float())
    R, P = batch.response_width, batch.prompt_width
    return _value_head(model)(hidden[:, P - 1 : P - 1 + R]).squeeze(-1).float()


def sequence_scores(model: nn.Module, batch: PaddedBatch | PackedBatch) -> Tensor:
    """Reward-model score read at each sample's last real token: (b,)."""
    hidden = _hidden(model, batch)
    if isinstance(batch, PackedBatch):
        last = hidden[0, batch.last_index]
    else:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, batch.last_index]  # (b, H)
    return _value_head(model)(last).squeeze(-1).float()


# Attention implementations that honour transformers' packed-sequence masks; the first two
# run packed rows with variable-length kernels, the others with a dense block mask.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
_PACKING_ATTENTION = VARLEN_ATTENTION + ("sdpa", "eager", "flex_attention")


def _unwrapped(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)  # a DeepSpeed engine
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft


def attention_implementation(model: nn.Module) -> str | None:
    return getattr(_unwrapped(model).config, "_attn_implementation", None)


def packing_supported(model: nn.Module) -> tuple[bool, str]:
    """Whether `model` keeps packed samples apart, and if not, why.

    transformers' own decoder models build their causal mask with `masking_utils`, which turns
    position ids that restart at 0 into a block-diagonal mask when no attention mask is given.
    Code loaded with trust_remote_code builds its own mask and would let the samples of a row
    attend to each other, silently: such models are padded instead."""
    inner = _unwrapped(model)
    module = type(inner).__module__
    if not module.startswith("transformers.models."):
        return False, f"{type(inner).__name__} comes from {module}, not from transformers"
    attention = attention_implementation(model)
    if attention not in _PACKING_ATTENTION:
        return False, f"attention implementation {attention!r} does not take packed sequences"
    return True, ""


def save_hf(
    model: nn.Module, out_dir: str | Path, tokenizer=None, state_dict: dict | None = None
) -> None:
    """Save an HF folder: config.json and model.safetensors.

    Written with safetensors directly: under an initialised torch.distributed world,
    transformers' save_pretrained on a rank other than 0 writes no weight file (measured,
    DESIGN.md). Tensors that share storage (tied embeddings) are written once; loading
    re-ties them. `state_dict`: the weights to write instead of the model's own (ZeRO-3
    gathers them; a LoRA model writes its merged weights).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    tensors, seen = {}, set()
    for name, t in (model.state_dict() if state_dict is None else state_dict).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing
    them. transformers checkpoints a layer only while `layer.training` is True, and the roles
    keep models in eval mode (no dropout, so Forward and Train log-probs agree). So only the
    checkpointing modules themselves are flagged as training, not their children: dropout
    and attention-dropout modules stay in eval mode."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True
