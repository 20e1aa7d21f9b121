"""The typed run configuration: one dataclass per section, and the run plan derived from it.

A config file is plain Python read with `mmengine.Config.fromfile`. Its top-level lowercase
names are the sections below; UPPERCASE names are free constants (PIPE_MICRO_BATCH_NUM is read
from there) and names starting with "_" are private helpers. Any other key is an error, so a
typo never passes silently. This module is the schema (keys, types, defaults, ranges in field
metadata); `rlhf_pipe.validation` loads a file, checks it and returns the config as loaded
with its `RunPlan` (the derived values) attached as `cfg.plan`. Every error is a
`ConfigError` with a single line: "<file>: <key>: expected ..., got ...".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from rlhf_pipe.errors import ConfigError as ConfigError  # re-exported


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
    # Fused kernels for this model (rlhf_pipe.kernels): 'liger' (liger-kernel's Triton RMSNorm,
    # SwiGLU MLP and rotary embedding; CUDA only) or 'compile' (torch.compile of each decoder
    # layer). None: transformers' own modules.
    kernels: Optional[Literal["liger", "compile"]] = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed_config: Optional[dict] = None
    # LoRA through peft, ChatLearn's keys (policy and critic only). Base weights stay frozen;
    # the optimiser holds only the adapter (and the critic's value head). The other lora_*
    # keys may only be set with enable_lora; the plan's LoraSettings fill their defaults.
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
    # policy version); 'auto' is 'merged', measured faster (rlhf_pipe/validation.py: _lora_sync).
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


REMOTE_ONLY_KEYS = ("batch_size", "timeout_s", "max_retries", "backoff_s", "token_env")


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
    # vLLM's log-prob of each sampled token (the behaviour policy). None: only when
    # train_config.behaviour_correction needs them. True also without a correction, for the
    # behaviour/logp_diff metrics. Their cost is not settled: generation was 0.65-0.7 s
    # slower in the lease that asked, but as slow in a later one that did not (BENCHMARKS.md).
    behaviour_logprobs: Optional[bool] = None
    # True: each vLLM request samples from its own seed (rlhf_pipe.step_plan.request_seed), so
    # a run is reproducible whatever the batching, M, run-ahead or a resume. False: vLLM's one
    # generator (not reproducible), as TRL samples. On vLLM 0.25's GPU model runner seeds cost
    # nothing measurable: one kernel draws every request's noise (BENCHMARKS.md).
    request_seeds: bool = True
    # True: Python's cyclic garbage collector is off while the engine generates, on again
    # after it (rlhf_pipe.rollout.gc_pause): 13% of the 1.8B GRPO step on an H200.
    pause_gc: bool = True
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
    # torchrun: "nccl" broadcasts from the actor's rank to every vLLM worker, GPU to GPU;
    # "gloo_direct" does the same over gloo (host memory, no GPU needed); "gloo" goes through
    # the controller's host memory; "auto" takes nccl when the actor and every engine are on
    # distinct GPUs, else gloo. Any of them with max_staleness >= 1 (run-ahead).
    weight_sync_backend: Literal["auto", "nccl", "gloo_direct", "gloo"] = "auto"
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
    # The behaviour policy (the engine that sampled): None trains as before; 'tis' multiplies
    # the policy loss per token by min(pi_old / pi_vllm, behaviour_is_cap) (truncated IS, as
    # verl and TRL's vllm_importance_sampling_correction); 'decoupled' by pi_old / pi_vllm, 0
    # above the cap (AReaL's decoupled PPO). pi_old: the Forward stage's recompute (or Train's
    # own log-probs where that forward is skipped). Needs the vllm generator.
    behaviour_correction: Optional[Literal["tis", "decoupled"]] = None
    # TRL 1.16's vllm_importance_sampling_clip_max default
    behaviour_is_cap: float = field(default=3.0, metadata=_range(0.0, 1e6, lo_open=True))
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


@dataclass(frozen=True)
class LoraSettings:
    """A role's LoRA keys with their defaults filled (LORA_DEFAULTS; lora_alpha = lora_dim)."""

    dim: int
    alpha: float
    dropout: float
    layer: str

    def peft_kwargs(self) -> dict:
        """peft.LoraConfig's arguments (rlhf_pipe.lora.peft_config)."""
        return dict(
            r=self.dim,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=lora_target_modules(self.layer),
        )


@dataclass(frozen=True)
class RunPlan:
    """What `rlhf_pipe.validation.validate` derives from a valid config; the config itself stays
    as loaded. Read it as `cfg.plan`."""

    pipe_micro_bs: int  # samples per pipeline micro-batch: samples_per_step / PIPE_MICRO_BATCH_NUM
    samples_per_step: int  # prompt_dataset_config.samples_each_epoch x rollout_config.n
    generator: GeneratorConfig  # model_configs.policy.generator_config, defaults when not given
    lora: dict  # {model_configs role name: LoraSettings} for the roles with enable_lora
    lora_sync: Optional[str]  # 'merged' or 'adapter' for a LoRA policy ('auto' resolved), else None
    reward_scorers: dict  # {name: RewardScorerConfig}, in order (see validation.reward_scorers)
    metric_loggers: tuple  # the trackers a run logs to (see metric_loggers)

    @property
    def reward_has_model(self) -> bool:
        """Whether the reward role holds a learned model (and so needs ranks and a GPU)."""
        return any(sc.model_path for sc in self.reward_scorers.values())


@dataclass
class RunConfig:
    """The config as loaded; `plan` holds the values derived from it."""

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
    # Set by rlhf_pipe.validation.from_dict; read through `plan`.
    _plan: Optional[RunPlan] = field(default=None, compare=False, repr=False)

    @property
    def plan(self) -> RunPlan:
        if self._plan is None:
            raise RuntimeError("no run plan: build the config with rlhf_pipe.validation")
        return self._plan

    @property
    def uses_critic(self) -> bool:
        return self.model_configs.critic is not None


SECTIONS = {
    f.name: f
    for f in dataclasses.fields(RunConfig)
    if f.name not in ("pipe_micro_batch_num", "constants", "source", "_plan")
}


METRIC_LOGGERS = ("jsonl", "tensorboard", "wandb")
WANDB_KEYS = ("entity", "group", "name", "notes", "project", "tags")


def metric_loggers(t: TrainConfig) -> tuple[str, ...]:
    """The trackers a run logs to, from train_config.loggers and the older `tensorboard`."""
    if t.loggers is None:
        return ("jsonl", "tensorboard") if t.tensorboard else ("jsonl",)
    return tuple(t.loggers)


def work_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train_config.work_dir)
