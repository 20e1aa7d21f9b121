"""Typed run configuration, loaded from a Python config file and validated once at start.

A config file is plain Python read with `mmengine.Config.fromfile`. Its top-level lowercase
names are the sections below; UPPERCASE names are free constants (PIPE_MICRO_BATCH_NUM is read
from there) and names starting with "_" are private helpers. Any other key is an error, so a
typo never passes silently. Every check lives in this module and raises `ConfigError` with a
single line: "<file>: <key>: expected ..., got ...".
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from rlhf_pipe.data import DataError, parse_dataset_spec


class ConfigError(ValueError):
    """A bad config value. `str(err)` is the whole one-line message. Any URL quoted in it
    (e.g. a bad value's repr) is shown redacted: credentials never reach an error line."""

    def __init__(self, message: str):
        from rlhf_pipe.rewards.http import redact_url

        super().__init__(
            re.sub(
                r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+",
                lambda m: redact_url(m.group(0)),
                str(message),
            )
        )


def _ge(lo):
    return {"ge": lo}


def _range(lo, hi, lo_open=False):
    return {"ge": lo, "le": hi, "lo_open": lo_open}


# ----------------------------------------------------------------------------- sections


@dataclass
class ParallelConfig:
    data: dict = field(default_factory=lambda: {"size": 1})
    tensor: dict = field(default_factory=lambda: {"size": 1})


@dataclass
class TrainerConfig:
    """How one model runs: precision, optimiser, parallel sizes, DeepSpeed dict."""

    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lr: float = field(default=1e-6, metadata=_range(0.0, 1.0))
    weight_decay: float = field(default=0.0, metadata=_ge(0.0))
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = field(default=1e-8, metadata=_range(0.0, 1.0, lo_open=True))
    lr_warmup_steps: int = field(default=0, metadata=_ge(0))
    max_grad_norm: Optional[float] = field(default=1.0, metadata=_ge(0.0))
    gradient_checkpointing: bool = False
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed_config: Optional[dict] = None
    # LoRA through peft, ChatLearn's keys (policy and critic only). Base weights stay frozen;
    # the optimiser holds only the adapter (and the critic's value head). The other lora_*
    # keys may only be set with enable_lora; `validate` fills their defaults.
    enable_lora: bool = False
    lora_dim: Optional[int] = field(default=None, metadata=_ge(1))  # rank r; default 8
    # Scaling is lora_alpha / lora_dim; default lora_dim (scaling 1, ChatLearn's default).
    lora_alpha: Optional[float] = field(default=None, metadata=_range(0.0, 1e6, lo_open=True))
    # Active in the Train stage's forward passes only (Forward-stage log-probs stay exact).
    lora_dropout: Optional[float] = field(default=None, metadata=_range(0.0, 0.99))
    # Comma-separated: HF module names (q_proj, ...) and/or ChatLearn's layer classes, see
    # LORA_LAYER_ALIASES. Default: every linear layer of the transformer blocks.
    lora_layer: Optional[str] = None


# ChatLearn names Megatron layer classes; on HF Llama/Qwen2-style models they are these
# modules (fused qkv_proj/gate_up_proj cover Phi-3-style models). "LinearLayer", a plain
# linear, matches every nn.Linear in the blocks (peft's "all-linear", head excluded).
LORA_LAYER_ALIASES = {
    "ColumnParallelLinear": (
        "q_proj",
        "k_proj",
        "v_proj",
        "qkv_proj",
        "gate_proj",
        "up_proj",
        "gate_up_proj",
    ),
    "RowParallelLinear": ("o_proj", "down_proj"),
    "LinearLayer": ("all-linear",),
    "all-linear": ("all-linear",),
}
LORA_DEFAULTS = dict(
    lora_dim=8, lora_dropout=0.0, lora_layer="ColumnParallelLinear,LinearLayer,RowParallelLinear"
)
VLLM_MAX_LORA_RANK = 512  # vLLM's largest max_lora_rank


def lora_target_modules(lora_layer: str) -> list | str:
    """'ColumnParallelLinear,o_proj' -> peft target_modules ('all-linear' wins when named)."""
    names = []
    for item in (x.strip() for x in lora_layer.split(",")):
        names.extend(LORA_LAYER_ALIASES.get(item, (item,)))
    return "all-linear" if "all-linear" in names else sorted(set(names))


@dataclass
class BatchGenerationConfig:
    """ChatLearn's batch-generation settings for the training prompts."""

    ranking: bool = False  # sort each step's prompts by length before generation
    min_prompt_length: int = field(default=0, metadata=_ge(0))  # shorter prompts are skipped


@dataclass
class GeneratorConfig:
    generator_type: Literal["vllm", "hf"] = "vllm"
    num_engines: int = field(default=1, metadata=_ge(1))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    batch_generation: BatchGenerationConfig = field(default_factory=BatchGenerationConfig)
    # With a LoRA policy: 'merged' sends base + adapter merged under the base model's names;
    # 'adapter' sends only the adapter, served by vLLM's LoRA support (one LoRARequest per
    # policy version); 'auto' is 'merged', measured faster (rlhf_pipe/lora.py: sync_mode).
    lora_sync: Literal["auto", "merged", "adapter"] = "auto"


@dataclass
class RewardScorerConfig:
    """One entry of `model_configs.reward.scorers`: exactly one of model_path, url, reward_fn.
    The total reward is the sum of weight x score over the scorers."""

    weight: float = field(default=1.0, metadata=_range(-1e6, 1e6))  # finite; < 0 penalises
    model_path: Optional[str] = None  # a learned reward model (HF folder), on the reward ranks
    url: Optional[str] = field(default=None, repr=False)  # a remote reward model
    #                                  (rlhf_pipe.rewards.http); repr=False: may hold a token
    reward_fn: Optional[str] = None  # a rule: "module:function", fn(prompts, responses)
    trust_remote_code: bool = False
    # url only: samples per request, seconds per request, retries with backoff_s * 2**try,
    # and an environment variable holding a bearer token.
    batch_size: int = field(default=16, metadata=_ge(1))
    timeout_s: float = field(default=30.0, metadata=_range(0.0, 1e6, lo_open=True))
    max_retries: int = field(default=3, metadata=_ge(0))
    backoff_s: float = field(default=0.5, metadata=_range(0.0, 600.0))
    token_env: Optional[str] = None


_REMOTE_ONLY = ("batch_size", "timeout_s", "max_retries", "backoff_s", "token_env")


@dataclass
class ModelConfig:
    model_path: Optional[str] = None
    model_type: Optional[str] = None
    trust_remote_code: bool = False
    trainer_config: TrainerConfig = field(default_factory=TrainerConfig)
    generator_config: Optional[GeneratorConfig] = None
    # reward only: a rule-based function "module:function" used instead of / beside a model
    reward_fn: Optional[str] = None
    # reward only: named, weighted scorers {name: RewardScorerConfig fields}, instead of
    # model_path / reward_fn. Each scorer's mean is logged as reward/<name>.
    scorers: Optional[dict] = None


@dataclass
class ModelConfigs:
    policy: ModelConfig
    critic: Optional[ModelConfig] = None
    reference: Optional[ModelConfig] = None
    reward: Optional[ModelConfig] = None


@dataclass
class TokenizerConfig:
    tokenizer_path: Optional[str] = None
    padding_side: Literal["left"] = "left"
    trust_remote_code: bool = False


@dataclass
class RolloutConfig:
    max_new_tokens: int = field(default=64, metadata=_ge(1))
    temperature: float = field(default=1.0, metadata=_ge(0.0))
    top_p: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))
    top_k: int = -1
    n: int = field(default=1, metadata=_ge(1))
    ignore_eos: bool = False
    stop_token_list: Optional[str] = None  # ";"-separated stop strings
    # Timing workloads: [lo, hi] draws each request's answer length in that range from its
    # seed (with ignore_eos), so answers finish in a realistic, reproducible spread.
    response_length_range: Optional[list] = None
    # ChatLearn's three: beam search (temperature 0; the n best of `beam_width` beams, which
    # defaults to n); new_token_limit=True caps answers at max_new_tokens, False lets each
    # answer fill the sequence up to max_model_len - prompt length; prompt_logprobs=k records
    # the log-prob of every prompt token (and its top k) on each sample.
    use_beam_search: bool = False
    beam_width: Optional[int] = field(default=None, metadata=_ge(1))
    new_token_limit: bool = True
    prompt_logprobs: Optional[int] = field(default=None, metadata=_ge(0))
    # Evaluation sampling; None takes the training value.
    eval_temperature: Optional[float] = field(default=None, metadata=_ge(0.0))
    eval_top_p: Optional[float] = field(default=None, metadata=_range(0.0, 1.0, lo_open=True))
    eval_top_k: Optional[int] = None
    max_model_len: Optional[int] = field(default=None, metadata=_ge(1))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gpu_memory_utilization: float = field(default=0.5, metadata=_range(0.0, 1.0, lo_open=True))
    enforce_eager: bool = True
    seed: int = 0
    # Passed to vllm.LLM as they are (block_size, max_num_batched_tokens, swap_space, ...).
    engine_kwargs: dict = field(default_factory=dict)
    # Generation of a whole batch may legitimately take long; this bounds the wait for the
    # *next* finished request, so a dead engine becomes an error, not a hang.
    request_timeout_s: float = field(default=600.0, metadata=_range(0.0, 1e6, lo_open=True))


@dataclass
class RepeaterConfig:
    kl_coeff: float = field(default=0.01, metadata=_ge(0.0))
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    gamma: float = field(default=1.0, metadata=_range(0.0, 1.0))
    gae_lambda: float = field(default=0.99, metadata=_range(0.0, 1.0))
    clip_reward_min: Optional[float] = -5.0
    clip_reward_max: Optional[float] = 5.0
    # 'running': per micro-batch running mean/std (the reference's behaviour, not equal to
    # serial); 'batch': whole-batch, exact; False: off.
    norm_rewards: Union[Literal["running", "batch"], bool] = "running"
    # 'ppo': critic + GAE. Critic-free, with rollout_config.n answers per prompt: 'grpo'
    # (group mean/std), 'rloo' (leave-one-out mean), 'reinforce_pp' (batch-whitened returns).
    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = "ppo"
    # KL against the reference in the reward (per token for ppo/reinforce_pp, summed into the
    # score for grpo/rloo) or as a loss term (k3, on the actor's current log-probs).
    kl_mode: Literal["reward", "loss"] = "reward"
    # GRPO's group std: 'unbiased' divides the squares by n - 1 (verl, TRL, OpenRLHF);
    # 'population' by n (rlhf_pipe's earlier default; advantages sqrt(n / (n - 1)) larger).
    group_std: Literal["unbiased", "population"] = "unbiased"
    # PPO (GAE) advantages whitened over response tokens: 'batch' over the whole step (the
    # Advantage stage waits for the batch; exact), 'micro_batch' over each micro-batch (not
    # equal to serial), False off (the default: Train overlaps Forward; README says why).
    advantage_whiten: Literal[False, "batch", "micro_batch"] = False


@dataclass
class TrainConfig:
    pipe_micro_bs: Optional[int] = field(default=None, metadata=_ge(1))
    train_micro_bs: int = field(default=1, metadata=_ge(1))
    infer_micro_bs: int = field(default=1, metadata=_ge(1))
    ppo_epochs: int = field(default=1, metadata=_ge(1))
    num_mini_batches: int = field(default=1, metadata=_ge(1))
    policy_clip: float = field(default=0.2, metadata=_range(0.0, 1.0, lo_open=True))
    # Dual-clip PPO (Ye et al. 2020): for A < 0 the policy loss is at most -A * c. None: off;
    # verl's clip_ratio_c is 3.0.
    dual_clip_c: Optional[float] = field(default=None, metadata=_range(1.0, 1e6, lo_open=True))
    value_clip: Optional[float] = field(default=0.5, metadata=_ge(0.0))
    ppo_loss_weight: float = field(default=1.0, metadata=_ge(0.0))
    pretrain_loss_weight: float = field(default=0.5, metadata=_ge(0.0))
    value_loss_weight: float = field(default=1.0, metadata=_ge(0.0))
    loss_agg: Literal["token_mean", "seq_mean_token_mean"] = "token_mean"
    critic_warmup_step: int = field(default=0, metadata=_ge(0))
    max_train_step: int = field(default=10, metadata=_ge(1))
    save_interval: int = field(default=0, metadata=_ge(0))  # 0: only at the end
    keep_last: int = field(default=0, metadata=_ge(0))  # checkpoints kept; 0 keeps all
    log_interval: int = field(default=1, metadata=_ge(1))
    eval_interval: int = field(default=0, metadata=_ge(0))  # 0: no evaluation
    seed: int = 0
    work_dir: str = "work_dirs/rlhf_pipe"
    on_policy: bool = True  # assert every trained sample came from the current policy version
    # Generation runs ahead of training by up to this many steps (rlhf_pipe/pipeline/
    # run_ahead.py): step j is generated with the weights after step j - s - 1, so a sample is
    # trained at most s policy versions after its own. 0: serial order, exact. With s >= 1 the
    # staleness bound replaces the on_policy check.
    max_staleness: int = field(default=0, metadata=_ge(0))
    # NaN/inf in a reward or an update: 'stop' the run with a message, or 'skip' the update.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    stage_timeout_s: float = field(default=600.0, metadata=_range(0.0, 1e6, lo_open=True))
    weight_bucket_mb: int = field(default=256, metadata=_ge(1))  # actor -> vLLM sync buckets
    # torchrun: "nccl" broadcasts GPU to GPU; "gloo" goes through the controller's host memory;
    # "auto" takes nccl when the actor and every engine are on distinct GPUs.
    weight_sync_backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Model batches as the chunk's samples back to back in one row (no padding tokens) or
    # padded rows. 'auto' packs models whose attention has a variable-length kernel (flash
    # attention) and pads the others; True packs every model that keeps packed samples apart
    # (rlhf_pipe.models.packing_supported) and fails for the others
    # (rlhf_pipe.roles.choose_packing).
    pack_sequences: Union[Literal["auto"], bool] = "auto"
    # With one update per batch (ppo_epochs x num_mini_batches == 1) and no KL in the reward,
    # the Forward stage's actor log-probs equal those Train computes before it updates: skip
    # that forward and let Train's own (detached) log-probs be the old ones. The "kl" metric
    # is then not logged (kl_mode='loss' logs actor/kl_loss).
    skip_redundant_actor_forward: bool = True
    # Actor and reference log-probs straight from the hidden states, this many response tokens
    # at a time, so the (tokens, vocabulary) logits are never held whole (rlhf_pipe.ppo.
    # fused_head; Llama/Qwen/Mistral heads, not under ZeRO-3). 0: the full logits, as before.
    logit_chunk_tokens: int = field(default=4096, metadata=_ge(0))
    tensorboard: bool = True  # kept: without `loggers`, False leaves TensorBoard out
    # Metric trackers, each getting the same names: 'jsonl' (metrics.jsonl; required, the
    # report and resume read it), 'tensorboard', 'wandb'. None: jsonl + tensorboard, minus
    # tensorboard when `tensorboard` is False (rlhf_pipe.config.metric_loggers).
    loggers: Optional[list] = None
    # W&B run settings: project, name, tags, entity, group, notes (passed to wandb.init).
    wandb: Optional[dict] = None
    progress_bar: bool = True
    # ChatLearn's StreamDataset and relay buffer (README "Stream data and the relay buffer").
    # 'fixed': every step trains on samples_each_epoch x n samples (replayed ones take the place
    # of fresh ones); 'dynamic': replayed samples come on top, so a step may hold more.
    stream_data_loader_type: Literal["fixed", "dynamic"] = "fixed"
    max_relay_episode: int = field(default=0, metadata=_ge(-1))  # -1 keep all, 0 off, k newest
    relay_episode_offset: int = field(default=0, metadata=_ge(0))  # keep episodes from this step
    relay_sample_fn: Optional[str] = None  # "module:function", fn(episode_relay_buffers) -> dicts


@dataclass
class PlacementConfig:
    """Where the roles run (used by the torchrun launcher and `rlhf-pipe plan`).

    Each role's GPU count comes from model_configs: policy/critic/reference/reward
    `trainer_config.parallel.data.size`, rollout `generator_config.num_engines` x
    `generator_config.parallel.tensor.size`. The colocation switches merge roles onto the same
    ranks, as in the reference systems.
    """

    colocate_actor_ref: bool = False
    colocate_critic_reward: bool = False
    colocate_actor_critic: bool = False  # critic on the actor's ranks, in its process
    ref_reward_offload: bool = False  # reference/reward weights to CPU between uses
    colocate_all: bool = False  # every role on the same GPUs (e.g. one GPU)
    gpus_per_node: int = field(default=8, metadata=_ge(1))
    device: Literal["auto", "cpu", "cuda"] = "auto"  # single-process runs
    # torchrun: the GPU of each local rank, for layouts with more ranks than GPUs (by default
    # local rank r takes GPU r mod the GPU count).
    local_rank_gpus: Optional[list] = None


@dataclass
class PromptDatasetConfig:
    message_datasets: list = field(default_factory=list)  # "path::ratio[SYS]:name" strings
    samples_each_epoch: int = field(default=0, metadata=_ge(1))  # prompts per PPO step
    max_len: int = field(default=1024, metadata=_ge(1))  # max prompt tokens
    prompt_key: str = "prompt"
    shuffle: bool = True
    seed: int = 0


@dataclass
class PretrainDatasetConfig:
    message_datasets: list = field(default_factory=list)
    samples_each_epoch: int = field(default=0, metadata=_ge(1))
    max_len: int = field(default=1024, metadata=_ge(1))
    text_key: str = "text"
    seed: int = 0


@dataclass
class RunConfig:
    """The validated config. Derived sizes are filled in by `validate`."""

    model_configs: ModelConfigs
    prompt_dataset_config: PromptDatasetConfig
    rollout_config: RolloutConfig = field(default_factory=RolloutConfig)
    repeater_config: RepeaterConfig = field(default_factory=RepeaterConfig)
    train_config: TrainConfig = field(default_factory=TrainConfig)
    tokenizer_config: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain_dataset_config: Optional[PretrainDatasetConfig] = None
    placement_config: PlacementConfig = field(default_factory=PlacementConfig)
    eval_dataset_config: Optional[PromptDatasetConfig] = None
    pipe_micro_batch_num: int = 1
    constants: dict = field(default_factory=dict)
    source: str = "<config>"

    @property
    def samples_per_step(self) -> int:
        return self.prompt_dataset_config.samples_each_epoch * self.rollout_config.n

    @property
    def uses_critic(self) -> bool:
        return self.model_configs.critic is not None


SECTIONS = {
    f.name: f
    for f in dataclasses.fields(RunConfig)
    if f.name not in ("pipe_micro_batch_num", "constants", "source")
}


# ----------------------------------------------------------------------------- typed building


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if dataclasses.is_dataclass(tp):
        return "a dict"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str, src: str):
    """Return `value` checked against annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, src)
            except ConfigError as e:
                errors.append(e)
        for e in errors:  # a dict that failed inside a section: report the inner key
            if str(e).startswith(f"{src}: {key}."):
                raise e
        raise ConfigError(f"{src}: {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        # bool is an int subclass, so compare types too: True must not match 1.
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise ConfigError(f"{src}: {key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{src}: {key}: expected None, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {key}: expected a dict, got {value!r}")
        return build_section(tp, value, key, src)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (bool, str, dict, list):
        if isinstance(value, tp) or (tp is list and isinstance(value, tuple)):
            return list(value) if tp is list else value
    else:
        return value
    raise ConfigError(f"{src}: {key}: expected {_type_name(tp)}, got {value!r}")


def _check_range(value, meta: dict, key: str, src: str) -> None:
    if value is None or not meta:
        return
    lo, hi = meta.get("ge"), meta.get("le")
    # A lower bound alone would let inf through (a learning rate of inf, a timeout that never
    # fires): every ranged number must be finite.
    if isinstance(value, float) and math.isinf(value):
        raise ConfigError(f"{src}: {key}: expected a finite number, got {value!r}")
    # Written as `not (in range)` so that NaN fails every range.
    if lo is not None and not (value > lo if meta.get("lo_open") else value >= lo):
        op = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"{src}: {key}: expected a value {op} {lo}, got {value!r}")
    if hi is not None and not value <= hi:
        raise ConfigError(f"{src}: {key}: expected a value <= {hi}, got {value!r}")


def build_section(cls, data: dict, prefix: str, src: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        name = unknown[0] if str(unknown[0]).isidentifier() else repr(unknown[0])
        raise ConfigError(
            f"{src}: {prefix}.{name}: unknown key (known: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{src}: {key}: required key is missing")
            continue
        value = _coerce(data[name], hints[name], key, src)
        _check_range(value, f.metadata, key, src)
        kwargs[name] = value
    return cls(**kwargs)


# ----------------------------------------------------------------------------- cross checks


def _fail(src, key, msg):
    if not msg.isprintable():  # e.g. a path with a line break: keep the message one line
        msg = msg.encode("unicode_escape").decode("ascii")
    raise ConfigError(f"{src}: {key}: {msg}")


METRIC_LOGGERS = ("jsonl", "tensorboard", "wandb")
WANDB_KEYS = ("entity", "group", "name", "notes", "project", "tags")


def metric_loggers(t: TrainConfig) -> tuple[str, ...]:
    """The trackers a run logs to, from train_config.loggers and the older `tensorboard`."""
    if t.loggers is None:
        return ("jsonl", "tensorboard") if t.tensorboard else ("jsonl",)
    return tuple(t.loggers)


def _check_loggers(src: str, t: TrainConfig) -> None:
    if t.loggers is not None:
        for name in t.loggers:
            if name not in METRIC_LOGGERS:
                _fail(
                    src,
                    "train_config.loggers",
                    f"unknown logger {name!r} (known: {', '.join(METRIC_LOGGERS)})",
                )
        if "jsonl" not in t.loggers:
            _fail(src, "train_config.loggers", "must include 'jsonl' (report and resume read it)")
        if "tensorboard" in t.loggers and not t.tensorboard:
            _fail(
                src,
                "train_config.tensorboard",
                "False, but train_config.loggers names 'tensorboard'; drop one of them",
            )
    if t.wandb is not None:
        for key, value in t.wandb.items():
            if key not in WANDB_KEYS:
                _fail(
                    src,
                    f"train_config.wandb.{key}",
                    f"unknown key (known: {', '.join(WANDB_KEYS)})",
                )
            ok = isinstance(value, str) or value is None
            if key == "tags":
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            if not ok:
                want = "a list of strings" if key == "tags" else "a string"
                _fail(src, f"train_config.wandb.{key}", f"expected {want}, got {value!r}")
    if "wandb" in metric_loggers(t):
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            _fail(
                src,
                "train_config.loggers",
                "'wandb' needs the wandb package: pip install 'rlhf_pipe[wandb]'",
            )


def validate(cfg: RunConfig) -> RunConfig:
    """All divisibility, range and presence checks that span keys. Fills derived sizes."""
    src, t, r = cfg.source, cfg.train_config, cfg.rollout_config
    m = cfg.pipe_micro_batch_num
    _check_loggers(src, t)
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        _fail(src, "PIPE_MICRO_BATCH_NUM", f"expected an int >= 1, got {m!r}")
    prompts = cfg.prompt_dataset_config.samples_each_epoch
    if prompts < 1:
        _fail(src, "prompt_dataset_config.samples_each_epoch", "required, expected an int >= 1")
    if not cfg.prompt_dataset_config.message_datasets:
        _fail(src, "prompt_dataset_config.message_datasets", "expected at least one dataset")
    for section in ("prompt_dataset_config", "pretrain_dataset_config"):
        for i, spec in enumerate(getattr(getattr(cfg, section), "message_datasets", [])):
            key = f"{section}.message_datasets[{i}]"
            if not isinstance(spec, str):
                _fail(src, key, f"expected a 'path::ratio[SYS]:name' string, got {spec!r}")
            try:
                parse_dataset_spec(spec)
            except DataError as e:
                _fail(src, key, str(e))
    if t.max_staleness and t.relay_sample_fn and t.stream_data_loader_type == "fixed":
        _fail(
            src,
            "train_config.max_staleness",
            "with a relay_sample_fn, run-ahead needs stream_data_loader_type='dynamic' (replayed "
            "samples are chosen when their step trains; in 'fixed' mode they would change how "
            "many prompts are generated ahead of time)",
        )
    total = cfg.samples_per_step
    if total % m:
        _fail(
            src,
            "PIPE_MICRO_BATCH_NUM",
            f"samples per step ({prompts} prompts x n={r.n} = {total}) must be divisible "
            f"by PIPE_MICRO_BATCH_NUM={m}",
        )
    if t.pipe_micro_bs is None:
        t.pipe_micro_bs = total // m
    elif t.pipe_micro_bs * m != total:
        _fail(
            src,
            "train_config.pipe_micro_bs",
            f"expected samples per step / PIPE_MICRO_BATCH_NUM = {total}/{m} = {total // m}, "
            f"got {t.pipe_micro_bs}",
        )
    for name in ("train_micro_bs", "infer_micro_bs"):
        size = getattr(t, name)
        if t.pipe_micro_bs % size:
            _fail(
                src,
                f"train_config.{name}",
                f"must divide pipe_micro_bs={t.pipe_micro_bs} (so micro-batch chunks are the "
                f"same in pipelined and serial runs), got {size}",
            )
    if total % t.num_mini_batches:
        _fail(
            src,
            "train_config.num_mini_batches",
            f"must divide samples per step ({total}), got {t.num_mini_batches}",
        )
    if (total // t.num_mini_batches) % t.train_micro_bs:
        _fail(
            src,
            "train_config.train_micro_bs",
            f"must divide the mini-batch size {total // t.num_mini_batches}, "
            f"got {t.train_micro_bs}",
        )

    lr = r.response_length_range
    if lr is not None:
        if (
            len(lr) != 2
            or not all(type(x) is int for x in lr)
            or not 1 <= lr[0] <= lr[1]
            or lr[1] > r.max_new_tokens
        ):
            _fail(
                src,
                "rollout_config.response_length_range",
                f"expected [lo, hi] ints with 1 <= lo <= hi <= max_new_tokens "
                f"({r.max_new_tokens}), got {lr!r}",
            )
        if not r.ignore_eos:
            _fail(
                src,
                "rollout_config.response_length_range",
                "needs rollout_config.ignore_eos = True (lengths are forced)",
            )

    mc = cfg.model_configs
    if not mc.policy.model_path:
        _fail(src, "model_configs.policy.model_path", "required key is missing")
    if mc.policy.generator_config is None:
        mc.policy.generator_config = GeneratorConfig()
    if r.response_length_range is not None and mc.policy.generator_config.generator_type != "vllm":
        _fail(
            src,
            "rollout_config.response_length_range",
            "needs the vllm generator (model_configs.policy.generator_config.generator_type)",
        )
    reward = mc.reward
    if reward is None or (
        not reward.model_path and not reward.reward_fn and reward.scorers is None
    ):
        _fail(src, "model_configs.reward", "expected a model_path, a reward_fn or both")
    if reward.reward_fn and ":" not in reward.reward_fn:
        _fail(
            src,
            "model_configs.reward.reward_fn",
            f"expected 'module:function', got {reward.reward_fn!r}",
        )
    # `rlhf-pipe plan` validates cluster configs on a machine without their model folders.
    check_paths = os.environ.get("RLHF_PIPE_SKIP_PATH_CHECKS", "") not in ("1", "true", "yes")
    if reward.scorers is not None:
        reward.scorers = _check_scorers(reward, src, check_paths)
    for role in ("policy", "critic", "reference"):
        if getattr(mc, role) is not None and getattr(mc, role).scorers is not None:
            _fail(src, f"model_configs.{role}.scorers", "only the reward model has scorers")
    algo = cfg.repeater_config.algorithm
    if mc.critic is None and algo == "ppo":
        _fail(
            src,
            "model_configs.critic",
            "algorithm 'ppo' needs a critic model (or set "
            "repeater_config.algorithm to 'grpo', 'rloo' or 'reinforce_pp')",
        )
    if algo in ("grpo", "rloo") and cfg.rollout_config.n < 2:
        _fail(
            src,
            "rollout_config.n",
            f"algorithm {algo!r} needs n >= 2 answers per prompt, got {cfg.rollout_config.n}",
        )
    whiten = cfg.repeater_config.advantage_whiten
    if whiten is not False and algo != "ppo":
        _fail(
            src,
            "repeater_config.advantage_whiten",
            f"applies to algorithm 'ppo' (GAE); {algo!r} normalises its own advantages, "
            f"set it to False",
        )
    if whiten == "micro_batch" and cfg.repeater_config.norm_rewards == "batch":
        _fail(
            src,
            "repeater_config.advantage_whiten",
            "'micro_batch' with norm_rewards='batch' would whiten over the whole batch "
            "(the Advantage stage waits for it): use 'batch'",
        )
    if mc.reference is None and cfg.repeater_config.kl_coeff > 0:
        _fail(
            src,
            "model_configs.reference",
            f"required when repeater_config.kl_coeff > 0 (got {cfg.repeater_config.kl_coeff})",
        )
    if mc.critic is not None and not mc.critic.model_path:
        _fail(src, "model_configs.critic.model_path", "required key is missing")
    if mc.reference is not None and not mc.reference.model_path:
        _fail(src, "model_configs.reference.model_path", "required key is missing")
    for role in ("policy", "critic", "reference", "reward"):
        model = getattr(mc, role)
        if model is None:
            continue
        if check_paths and model.model_path:
            _check_model_folder(src, f"model_configs.{role}.model_path", model.model_path)
        _validate_lora(src, role, model, t.weight_sync_backend)
        betas = model.trainer_config.betas
        if len(betas) != 2 or not all(type(b) in (int, float) for b in betas):
            _fail(
                src,
                f"model_configs.{role}.trainer_config.betas",
                f"expected two floats, got {betas!r}",
            )
        if model.trainer_config.deepspeed_config is not None:
            from rlhf_pipe.zero import deepspeed_problem, zero_stage  # lazily: imports torch

            if not (model.model_path or (role == "reward" and reward_has_model(model))):
                _fail(
                    src,
                    f"model_configs.{role}.trainer_config.deepspeed_config",
                    "set, but there is no model_path (a reward_fn runs no model)",
                )
            problem = deepspeed_problem(role, model.trainer_config)
            if problem:
                _fail(
                    src,
                    f"model_configs.{role}.trainer_config.deepspeed_config.{problem[0]}",
                    problem[1],
                )
            if (
                role == "policy"
                and zero_stage(model.trainer_config.deepspeed_config) == 3
                and mc.policy.generator_config.generator_type == "hf"
            ):
                _fail(
                    src,
                    "model_configs.policy.generator_config.generator_type",
                    "'hf' generates with a copy of the actor's module, which ZeRO-3 "
                    "partitions: use 'vllm', or ZeRO-2",
                )
        parallels = [("trainer_config", model.trainer_config.parallel)]
        if model.generator_config is not None:
            parallels.append(("generator_config", model.generator_config.parallel))
        for where, par in parallels:
            for axis in ("data", "tensor"):
                size = getattr(par, axis).get("size", 1)
                if type(size) is not int or size < 1:
                    _fail(
                        src,
                        f"model_configs.{role}.{where}.parallel.{axis}.size",
                        f"expected an int >= 1, got {size!r}",
                    )
    tok = cfg.tokenizer_config.tokenizer_path
    if check_paths and tok and not os.path.isdir(tok):
        _fail(src, "tokenizer_config.tokenizer_path", f"no such folder: {tok}")

    _check_sampling(cfg)
    if r.max_model_len is not None and r.max_model_len <= r.max_new_tokens:
        _fail(
            src,
            "rollout_config.max_model_len",
            f"must exceed max_new_tokens={r.max_new_tokens}, got {r.max_model_len}",
        )
    lo, hi = cfg.repeater_config.clip_reward_min, cfg.repeater_config.clip_reward_max
    if lo is not None and hi is not None and lo >= hi:
        _fail(
            src, "repeater_config.clip_reward_min", f"must be below clip_reward_max={hi}, got {lo}"
        )
    if t.eval_interval and cfg.eval_dataset_config is None:
        _fail(
            src,
            "train_config.eval_interval",
            f"is {t.eval_interval}, but there is no eval_dataset_config",
        )
    if mc.critic is None and t.critic_warmup_step:
        _fail(src, "train_config.critic_warmup_step", "set, but there is no critic model")
    if t.relay_sample_fn is not None and ":" not in t.relay_sample_fn:
        _fail(
            src,
            "train_config.relay_sample_fn",
            f"expected 'module:function', got {t.relay_sample_fn!r}",
        )
    if t.relay_sample_fn is not None and t.max_relay_episode == 0:
        _fail(
            src,
            "train_config.relay_sample_fn",
            "set, but max_relay_episode is 0 (relay off); set it to -1 or a count >= 1",
        )
    min_len = mc.policy.generator_config.batch_generation.min_prompt_length
    if min_len > cfg.prompt_dataset_config.max_len:
        _fail(
            src,
            "model_configs.policy.generator_config.batch_generation.min_prompt_length",
            f"exceeds prompt_dataset_config.max_len={cfg.prompt_dataset_config.max_len}, so "
            f"no prompt could be used; got {min_len}",
        )
    return cfg


def _check_sampling(cfg: RunConfig) -> None:
    """use_beam_search, new_token_limit, prompt_logprobs against the rest of the config."""
    src, r = cfg.source, cfg.rollout_config
    generator = cfg.model_configs.policy.generator_config.generator_type
    if r.use_beam_search:
        if r.beam_width is not None and r.beam_width < r.n:
            _fail(
                src,
                "rollout_config.beam_width",
                f"must be >= n={r.n} (the n best beams are the answers), got {r.beam_width}",
            )
        if r.stop_token_list:
            _fail(
                src,
                "rollout_config.use_beam_search",
                "vLLM's beam search takes no stop "
                "strings; remove stop_token_list or turn beam search off",
            )
        if r.prompt_logprobs is not None:
            _fail(
                src,
                "rollout_config.use_beam_search",
                "vLLM's beam search returns no "
                "prompt log-probs; remove prompt_logprobs or turn beam search off",
            )
    elif r.beam_width is not None:
        _fail(src, "rollout_config.beam_width", "set, but use_beam_search is False")
    if generator == "hf":
        if r.stop_token_list:
            _fail(
                src,
                "rollout_config.stop_token_list",
                "needs the vllm generator (model_configs.policy.generator_config."
                "generator_type='vllm'); the hf generator has no stop strings",
            )
        for key in ("use_beam_search", "prompt_logprobs"):
            if getattr(r, key) not in (False, None):
                _fail(
                    src,
                    f"rollout_config.{key}",
                    "needs the vllm generator "
                    "(model_configs.policy.generator_config.generator_type='vllm')",
                )
    if not r.new_token_limit:
        if r.max_model_len is None:
            _fail(
                src,
                "rollout_config.new_token_limit",
                "False lets answers fill the sequence "
                "up to max_model_len, so rollout_config.max_model_len is required",
            )
        max_prompt = cfg.prompt_dataset_config.max_len
        if max_prompt >= r.max_model_len:
            _fail(
                src,
                "prompt_dataset_config.max_len",
                f"must be below rollout_config."
                f"max_model_len={r.max_model_len} with new_token_limit=False (room for an "
                f"answer), got {max_prompt}",
            )


def _check_model_folder(src, key, path) -> None:
    if not os.path.isdir(path):
        _fail(src, key, f"no such folder: {path}")
    if not any(
        n.endswith((".safetensors", ".bin", ".safetensors.index.json")) for n in os.listdir(path)
    ):
        _fail(src, key, f"no weights (*.safetensors or *.bin) in {path}")


def _check_scorers(reward: ModelConfig, src: str, check_paths: bool) -> dict:
    """model_configs.reward.scorers -> {name: RewardScorerConfig}, every entry checked."""
    from rlhf_pipe.rewards.http import redact_url

    base = "model_configs.reward.scorers"
    if reward.model_path or reward.reward_fn:
        _fail(
            src, base, "give every scorer here, or model_path / reward_fn without scorers, not both"
        )
    if not reward.scorers:
        _fail(src, base, "expected at least one scorer")
    out = {}
    for name, raw in reward.scorers.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            _fail(
                src,
                f"{base}.{name!r}",
                "a scorer name is letters, digits, '_', '.' or '-' "
                "(it names the metric reward/<name>)",
            )
        key = f"{base}.{name}"
        sc = (
            raw
            if isinstance(raw, RewardScorerConfig)
            else _coerce(raw, RewardScorerConfig, key, src)
        )
        kinds = [k for k in ("model_path", "url", "reward_fn") if getattr(sc, k)]
        if len(kinds) != 1:
            _fail(
                src,
                key,
                f"expected exactly one of model_path, url, reward_fn, got "
                f"{', '.join(kinds) if kinds else 'none'}",
            )
        if sc.reward_fn and ":" not in sc.reward_fn:
            _fail(src, f"{key}.reward_fn", f"expected 'module:function', got {sc.reward_fn!r}")
        given = raw.keys() if isinstance(raw, dict) else ()
        for extra in _REMOTE_ONLY:
            if extra in given and not sc.url:
                _fail(src, f"{key}.{extra}", "only for a url scorer")
        if sc.url:
            _check_url(src, f"{key}.url", sc, redact_url(sc.url), check_paths)
        if check_paths and sc.model_path:
            _check_model_folder(src, f"{key}.model_path", sc.model_path)
        out[name] = sc
    return out


def _check_url(src: str, key: str, sc: RewardScorerConfig, shown: str, check_env: bool) -> None:
    """Messages show the URL redacted: credentials never reach an error line."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(sc.url)
        _ = parts.port  # raises on a bad port
    except ValueError:
        _fail(src, key, f"not a valid URL: {shown}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _fail(src, key, f"expected an http:// or https:// URL with a host, got {shown}")
    if sc.token_env is not None:
        if parts.username is not None:
            _fail(src, key, "credentials in the URL and token_env both given; use one")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", sc.token_env):
            _fail(
                src,
                key.replace(".url", ".token_env"),
                f"expected an environment variable name, got {sc.token_env!r}",
            )
        if check_env and not os.environ.get(sc.token_env):
            _fail(
                src,
                key.replace(".url", ".token_env"),
                f"environment variable {sc.token_env} is not set",
            )


def reward_scorers(reward: ModelConfig) -> dict:
    """The reward's scorers as {name: RewardScorerConfig}, in order. A single model_path is the
    scorer 'model' and a reward_fn the scorer 'reward_fn', both with weight 1, so the older
    configs keep their meaning (model score + function score)."""
    if reward.scorers is not None:
        return dict(reward.scorers)
    out = {}
    if reward.model_path:
        out["model"] = RewardScorerConfig(
            model_path=reward.model_path, trust_remote_code=reward.trust_remote_code
        )
    if reward.reward_fn:
        out["reward_fn"] = RewardScorerConfig(reward_fn=reward.reward_fn)
    return out


def reward_has_model(reward: ModelConfig | None) -> bool:
    """Whether the reward role holds a learned model (and so needs ranks and a GPU)."""
    return reward is not None and any(sc.model_path for sc in reward_scorers(reward).values())


def _validate_lora(src: str, role: str, model: ModelConfig, sync_backend: str) -> None:
    tc, key = model.trainer_config, f"model_configs.{role}.trainer_config"
    if not tc.enable_lora:
        for name in LORA_DEFAULTS.keys() | {"lora_alpha"}:
            if getattr(tc, name) is not None:
                _fail(src, f"{key}.{name}", "set, but enable_lora is False")
        gen = model.generator_config
        if gen is not None and gen.lora_sync != "auto":
            _fail(
                src,
                f"model_configs.{role}.generator_config.lora_sync",
                f"set to {gen.lora_sync!r}, but the policy has no LoRA (enable_lora is False)",
            )
        return
    if role not in ("policy", "critic"):
        _fail(
            src,
            f"{key}.enable_lora",
            "LoRA trains an adapter; only the policy and the "
            f"critic train, so it cannot be set for the {role}",
        )
    if tc.deepspeed_config:
        _fail(
            src,
            f"{key}.enable_lora",
            "LoRA under DeepSpeed is not built yet; remove "
            "deepspeed_config (an adapter's optimizer state is small) or enable_lora",
        )
    for name, default in LORA_DEFAULTS.items():
        if getattr(tc, name) is None:
            setattr(tc, name, default)
    if tc.lora_alpha is None:
        tc.lora_alpha = float(tc.lora_dim)
    items = [x.strip() for x in tc.lora_layer.split(",")]
    for item in items:
        if item not in LORA_LAYER_ALIASES and not item.isidentifier():
            _fail(
                src,
                f"{key}.lora_layer",
                f"expected comma-separated module names (e.g. q_proj,v_proj) or "
                f"{', '.join(LORA_LAYER_ALIASES)}, got {tc.lora_layer!r}",
            )
    gen = model.generator_config
    if gen is not None and gen.lora_sync == "adapter":
        if gen.generator_type != "vllm":
            _fail(
                src,
                f"model_configs.{role}.generator_config.lora_sync",
                f"'adapter' needs generator_type 'vllm', got {gen.generator_type!r}",
            )
        if sync_backend == "nccl":  # NCCL loads whole weights by name into the workers
            _fail(
                src,
                f"model_configs.{role}.generator_config.lora_sync",
                "'adapter' cannot go over train_config.weight_sync_backend 'nccl'; use "
                "'merged' or weight_sync_backend 'gloo'",
            )
        if tc.lora_dim > VLLM_MAX_LORA_RANK:
            _fail(
                src,
                f"{key}.lora_dim",
                f"vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANK} "
                f"(lora_sync 'adapter'), got {tc.lora_dim}",
            )


# ----------------------------------------------------------------------------- loading


def from_dict(raw: dict, source: str = "<config>") -> RunConfig:
    """Build and validate a RunConfig from a plain dict (the config file's top-level names)."""
    sections, constants = {}, {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(
                f"{source}: {key!r}: unknown key (known: {', '.join(sorted(SECTIONS))})"
            )
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if key.isupper():
            constants[key] = value
        elif key in SECTIONS:
            sections[key] = value
        else:
            raise ConfigError(
                f"{source}: {key}: unknown key (known: {', '.join(sorted(SECTIONS))})"
            )
    hints = typing.get_type_hints(RunConfig)
    kwargs = {}
    for name, f in SECTIONS.items():
        if name in sections:
            value = _coerce(sections[name], hints[name], name, source)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {name}: required section is missing")
    cfg = RunConfig(
        **kwargs,
        pipe_micro_batch_num=constants.get("PIPE_MICRO_BATCH_NUM", 1),
        constants=constants,
        source=source,
    )
    return validate(cfg)


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> RunConfig:
    """Load a Python config file. `overrides` maps dotted keys to values (CLI --set)."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    if not path.endswith(".py"):
        raise ConfigError(f"{path}: expected a Python config file ending in .py")
    import ast

    from mmengine import Config  # imported here: the math and data modules must not need it

    try:
        with open(path, "rb") as f:
            ast.parse(f.read(), filename=path)
    except SyntaxError as e:  # checked first: mmengine's own message hides the line
        where = f"{path}:{e.lineno}" if e.lineno else path  # no line for a NUL byte
        raise ConfigError(f"{where}: syntax error: {e.msg}") from None
    except ValueError as e:  # e.g. a NUL byte
        raise ConfigError(f"{path}: not a Python file: {e}") from None
    try:
        raw = Config.fromfile(path, lazy_import=False).to_dict()
    except (Exception, SystemExit) as e:  # the file is user code: its first error, one line
        raise ConfigError(
            f"{path}: failed to load: {type(e).__name__}: {e}".splitlines()[0]
        ) from None
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return from_dict(raw, source=path)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=3' -> ('a.b', 3); the value is a Python literal, else a string."""
    import ast

    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE")
    key, _, value = text.partition("=")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def work_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train_config.work_dir)
