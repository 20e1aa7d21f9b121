"""Loading and checking a run config: a config file -> the `RunConfig` as loaded, with the
values derived from it in `cfg.plan` (a `RunPlan`).

Every check of a config lives here and runs once, when the config loads: types and ranges
(`build_section`, from the schema's field metadata), then the checks that span keys
(`validate`). `validate` reads the config and never writes it. Checks that need facts known
only at run time stay where the fact is known, each with a comment saying so: the torchrun
layout (rlhf_pipe.placement.check, rlhf_pipe.train), the visible GPUs (trainer._pick_device,
train._gpu_of), the model's attention kernel (roles.choose_packing), the model's module names
(lora.apply_lora), the device and architecture fused kernels need (kernels.apply_kernels) and
importing user functions (trainer.resolve_function).

`check_paths=False` skips the checks against this machine (model and tokenizer folders, the
token_env variables): `rlhf-pipe plan` checks cluster configs where those are absent.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from typing import Any, Literal, Union

from rlhf_pipe.config import (
    LORA_DEFAULTS,
    LORA_LAYER_ALIASES,
    METRIC_LOGGERS,
    REMOTE_ONLY_KEYS,
    SECTIONS,
    VLLM_MAX_LORA_RANK,
    WANDB_KEYS,
    GeneratorConfig,
    LoraSettings,
    ModelConfig,
    RewardScorerConfig,
    RunConfig,
    RunPlan,
    TrainConfig,
    metric_loggers,
)
from rlhf_pipe.data import DataError, parse_dataset_spec
from rlhf_pipe.errors import ConfigError
from rlhf_pipe.protocols import MODEL_ROLES

# The model_configs entries, one per model role (the policy serves the actor and the rollout).
MODEL_CONFIG_KEYS = tuple(role.config_key for role in MODEL_ROLES)

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


def _fail(src, key, msg):
    if not msg.isprintable():  # e.g. a path with a line break: keep the message one line
        msg = msg.encode("unicode_escape").decode("ascii")
    raise ConfigError(f"{src}: {key}: {msg}")


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


def validate(cfg: RunConfig, check_paths: bool = True) -> RunPlan:
    """Every check that spans keys; returns the derived values. `cfg` is not changed."""
    src, m = cfg.source, cfg.pipe_micro_batch_num
    _check_loggers(src, cfg.train_config)
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        _fail(src, "PIPE_MICRO_BATCH_NUM", f"expected an int >= 1, got {m!r}")
    _check_datasets(cfg)
    pipe_micro_bs = _check_batch_sizes(cfg)
    generator = cfg.model_configs.policy.generator_config or GeneratorConfig()
    _check_response_lengths(cfg, generator)
    scorers = _check_reward(cfg, check_paths)
    _check_algorithm(cfg)
    lora = {}
    for role in MODEL_CONFIG_KEYS:
        model = getattr(cfg.model_configs, role)
        if model is not None:
            settings = _check_model(cfg, role, model, generator, scorers, check_paths)
            if settings is not None:
                lora[role] = settings
    tok = cfg.tokenizer_config.tokenizer_path
    if check_paths and tok and not os.path.isdir(tok):
        _fail(src, "tokenizer_config.tokenizer_path", f"no such folder: {tok}")
    _check_sampling(cfg, generator.generator_type)
    _check_behaviour(cfg, generator.generator_type)
    _check_rest(cfg, generator)
    return RunPlan(
        pipe_micro_bs=pipe_micro_bs,
        samples_per_step=_samples_per_step(cfg),
        generator=generator,
        lora=lora,
        lora_sync=_lora_sync(generator) if "policy" in lora else None,
        reward_scorers=scorers,
        metric_loggers=metric_loggers(cfg.train_config),
    )


def _samples_per_step(cfg: RunConfig) -> int:
    return cfg.prompt_dataset_config.samples_each_epoch * cfg.rollout_config.n


def _check_datasets(cfg: RunConfig) -> None:
    src = cfg.source
    if cfg.prompt_dataset_config.samples_each_epoch < 1:
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


def _check_batch_sizes(cfg: RunConfig) -> int:
    """The divisibility of the step's samples; returns pipe_micro_bs."""
    src, t, m = cfg.source, cfg.train_config, cfg.pipe_micro_batch_num
    prompts, n = cfg.prompt_dataset_config.samples_each_epoch, cfg.rollout_config.n
    total = _samples_per_step(cfg)
    if total % m:
        _fail(
            src,
            "PIPE_MICRO_BATCH_NUM",
            f"samples per step ({prompts} prompts x n={n} = {total}) must be divisible "
            f"by PIPE_MICRO_BATCH_NUM={m}",
        )
    pipe_micro_bs = total // m if t.pipe_micro_bs is None else t.pipe_micro_bs
    if pipe_micro_bs * m != total:
        _fail(
            src,
            "train_config.pipe_micro_bs",
            f"expected samples per step / PIPE_MICRO_BATCH_NUM = {total}/{m} = {total // m}, "
            f"got {t.pipe_micro_bs}",
        )
    for name in ("train_micro_bs", "infer_micro_bs"):
        size = getattr(t, name)
        if pipe_micro_bs % size:
            _fail(
                src,
                f"train_config.{name}",
                f"must divide pipe_micro_bs={pipe_micro_bs} (so micro-batch chunks are the "
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
    return pipe_micro_bs


def _check_response_lengths(cfg: RunConfig, generator: GeneratorConfig) -> None:
    src, r = cfg.source, cfg.rollout_config
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
    if not cfg.model_configs.policy.model_path:
        _fail(src, "model_configs.policy.model_path", "required key is missing")
    if lr is not None and generator.generator_type != "vllm":
        _fail(
            src,
            "rollout_config.response_length_range",
            "needs the vllm generator (model_configs.policy.generator_config.generator_type)",
        )


def _check_reward(cfg: RunConfig, check_paths: bool) -> dict:
    """model_configs.reward; returns its scorers (see reward_scorers)."""
    src, mc = cfg.source, cfg.model_configs
    reward = mc.reward
    if reward is None or (
        not reward.model_path and not reward.reward_fn and reward.scorers is None
    ):
        _fail(src, "model_configs.reward", "expected a model_path, a reward_fn or both")
    assert reward is not None  # _fail raised otherwise
    if reward.reward_fn and ":" not in reward.reward_fn:
        _fail(
            src,
            "model_configs.reward.reward_fn",
            f"expected 'module:function', got {reward.reward_fn!r}",
        )
    checked = None if reward.scorers is None else _check_scorers(reward, src, check_paths)
    for role in MODEL_CONFIG_KEYS[:-1]:  # all but the reward
        if getattr(mc, role) is not None and getattr(mc, role).scorers is not None:
            _fail(src, f"model_configs.{role}.scorers", "only the reward model has scorers")
    return reward_scorers(reward, checked)


def _check_algorithm(cfg: RunConfig) -> None:
    src, mc, rep = cfg.source, cfg.model_configs, cfg.repeater_config
    algo = rep.algorithm
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
    whiten = rep.advantage_whiten
    if whiten is not False and algo != "ppo":
        _fail(
            src,
            "repeater_config.advantage_whiten",
            f"applies to algorithm 'ppo' (GAE); {algo!r} normalises its own advantages, "
            f"set it to False",
        )
    if whiten == "micro_batch" and rep.norm_rewards == "batch":
        _fail(
            src,
            "repeater_config.advantage_whiten",
            "'micro_batch' with norm_rewards='batch' would whiten over the whole batch "
            "(the Advantage stage waits for it): use 'batch'",
        )
    if mc.reference is None and rep.kl_coeff > 0:
        _fail(
            src,
            "model_configs.reference",
            f"required when repeater_config.kl_coeff > 0 (got {rep.kl_coeff})",
        )
    if mc.critic is not None and not mc.critic.model_path:
        _fail(src, "model_configs.critic.model_path", "required key is missing")
    if mc.reference is not None and not mc.reference.model_path:
        _fail(src, "model_configs.reference.model_path", "required key is missing")


def _check_model(
    cfg: RunConfig,
    role: str,
    model: ModelConfig,
    generator: GeneratorConfig,
    scorers: dict,
    check_paths: bool,
) -> LoraSettings | None:
    """One model_configs entry; returns its LoRA settings (None without LoRA)."""
    src, tc = cfg.source, model.trainer_config
    if check_paths and model.model_path:
        _check_model_folder(src, f"model_configs.{role}.model_path", model.model_path)
    lora = _check_lora(src, role, model, cfg.train_config.weight_sync_backend)
    betas = tc.betas
    if len(betas) != 2 or not all(type(b) in (int, float) for b in betas):
        _fail(
            src,
            f"model_configs.{role}.trainer_config.betas",
            f"expected two floats, got {betas!r}",
        )
    has_model = role == "reward" and any(sc.model_path for sc in scorers.values())
    if tc.deepspeed_config is not None:
        _check_deepspeed(src, role, model, generator, has_model)
    if tc.kernels is not None:
        _check_kernels(cfg, role, model, has_model)
    parallels = [("trainer_config", tc.parallel)]
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
    return lora


def _check_kernels(cfg: RunConfig, role: str, model: ModelConfig, has_model: bool) -> None:
    """A CPU named here fails here; a device known only at load (placement_config.device
    'auto' without a GPU, torchrun ranks) fails there (rlhf_pipe.kernels.apply_kernels)."""
    key = f"model_configs.{role}.trainer_config.kernels"
    if not (model.model_path or has_model):
        _fail(cfg.source, key, "set, but there is no model_path (a reward_fn runs no model)")
    if model.trainer_config.kernels == "liger" and cfg.placement_config.device == "cpu":
        _fail(
            cfg.source,
            key,
            "'liger' runs Triton kernels on a CUDA GPU, but placement_config.device is 'cpu' "
            "(use 'compile' or None)",
        )
    ds = model.trainer_config.deepspeed_config
    if model.trainer_config.kernels == "compile" and ds and zero_stage(ds) == 3:
        _fail(
            cfg.source,
            key,
            "'compile' under ZeRO-3: DeepSpeed gathers each layer's weights in module hooks, "
            "which split a compiled layer into many graphs and recompiles (measured: 14 graphs "
            "on the tiny model, the recompile limit hit); use ZeRO-2, 'liger' or None",
        )


def _check_deepspeed(
    src: str, role: str, model: ModelConfig, generator: GeneratorConfig, has_model: bool
) -> None:
    tc, ds = model.trainer_config, model.trainer_config.deepspeed_config or {}
    if not (model.model_path or has_model):
        _fail(
            src,
            f"model_configs.{role}.trainer_config.deepspeed_config",
            "set, but there is no model_path (a reward_fn runs no model)",
        )
    problem = deepspeed_problem(role, tc)
    if problem:
        _fail(
            src,
            f"model_configs.{role}.trainer_config.deepspeed_config.{problem[0]}",
            problem[1],
        )
    if role == "policy" and zero_stage(ds) == 3 and generator.generator_type == "hf":
        _fail(
            src,
            "model_configs.policy.generator_config.generator_type",
            "'hf' generates with a copy of the actor's module, which ZeRO-3 "
            "partitions: use 'vllm', or ZeRO-2",
        )


def _check_rest(cfg: RunConfig, generator: GeneratorConfig) -> None:
    src, t, r, mc = cfg.source, cfg.train_config, cfg.rollout_config, cfg.model_configs
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
    if t.max_staleness and t.relay_sample_fn and t.stream_data_loader_type == "fixed":
        _fail(
            src,
            "train_config.max_staleness",
            "with a relay_sample_fn, run-ahead needs stream_data_loader_type='dynamic' (replayed "
            "samples are chosen when their step trains; in 'fixed' mode they would change how "
            "many prompts are generated ahead of time)",
        )
    min_len = generator.batch_generation.min_prompt_length
    if min_len > cfg.prompt_dataset_config.max_len:
        _fail(
            src,
            "model_configs.policy.generator_config.batch_generation.min_prompt_length",
            f"exceeds prompt_dataset_config.max_len={cfg.prompt_dataset_config.max_len}, so "
            f"no prompt could be used; got {min_len}",
        )


def _check_behaviour(cfg: RunConfig, generator: str) -> None:
    """What the generator must honour: request_seeds=False and the behaviour log-probs (and
    train_config.behaviour_correction, which needs them) are the vllm generator's."""
    src, r, mode = cfg.source, cfg.rollout_config, cfg.train_config.behaviour_correction
    if not r.request_seeds and generator == "hf":
        _fail(
            src,
            "rollout_config.request_seeds",
            "False applies to the vllm generator; the hf generator always seeds its chunks",
        )
    if r.behaviour_logprobs and generator == "hf":
        _fail(
            src,
            "rollout_config.behaviour_logprobs",
            "needs the vllm generator: the hf generator returns no behaviour log-probs",
        )
    if mode is None:
        return
    key = "train_config.behaviour_correction"
    if r.behaviour_logprobs is False:
        _fail(
            src,
            "rollout_config.behaviour_logprobs",
            f"is False, but {key}={mode!r} reweights by them (set it to None or True)",
        )
    if generator == "hf":
        _fail(
            src,
            key,
            f"{mode!r} needs the vllm generator: the hf generator returns no behaviour log-probs",
        )
    if r.use_beam_search:
        _fail(src, key, f"{mode!r} needs sampled answers: beam search returns no log-probs")
    logprobs_mode = r.engine_kwargs.get("logprobs_mode", "raw_logprobs")
    if logprobs_mode != "raw_logprobs":
        _fail(
            src,
            "rollout_config.engine_kwargs.logprobs_mode",
            f"must be 'raw_logprobs' with {key}={mode!r} (the trainer's log-probs are of the "
            f"raw logits), got {logprobs_mode!r}",
        )


def _check_sampling(cfg: RunConfig, generator: str) -> None:
    """use_beam_search, new_token_limit, prompt_logprobs against the rest of the config."""
    src, r = cfg.source, cfg.rollout_config
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
        for extra in REMOTE_ONLY_KEYS:
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


def _check_lora(src: str, role: str, model: ModelConfig, sync_backend: str) -> LoraSettings | None:
    """A role's lora_* keys; returns them with defaults filled (None without enable_lora)."""
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
        return None
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
    filled = {n: d if getattr(tc, n) is None else getattr(tc, n) for n, d in LORA_DEFAULTS.items()}
    dim, layer = int(filled["lora_dim"]), str(filled["lora_layer"])
    alpha = float(dim) if tc.lora_alpha is None else tc.lora_alpha
    for item in (x.strip() for x in layer.split(",")):
        if item not in LORA_LAYER_ALIASES and not item.isidentifier():
            _fail(
                src,
                f"{key}.lora_layer",
                f"expected comma-separated module names (e.g. q_proj,v_proj) or "
                f"{', '.join(LORA_LAYER_ALIASES)}, got {layer!r}",
            )
    gen = model.generator_config
    if gen is not None and gen.lora_sync == "adapter":
        _check_adapter_sync(src, role, gen, sync_backend, dim)
    return LoraSettings(dim=dim, alpha=alpha, dropout=float(filled["lora_dropout"]), layer=layer)


def _check_adapter_sync(
    src: str, role: str, gen: GeneratorConfig, sync_backend: str, dim: int
) -> None:
    key = f"model_configs.{role}.generator_config.lora_sync"
    if gen.generator_type != "vllm":
        _fail(src, key, f"'adapter' needs generator_type 'vllm', got {gen.generator_type!r}")
    if sync_backend in ("nccl", "gloo_direct"):  # they load whole weights into the workers
        _fail(
            src,
            key,
            f"'adapter' cannot go over train_config.weight_sync_backend {sync_backend!r}; use "
            "'merged' or weight_sync_backend 'gloo'",
        )
    if dim > VLLM_MAX_LORA_RANK:
        _fail(
            src,
            f"model_configs.{role}.trainer_config.lora_dim",
            f"vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANK} (lora_sync 'adapter'), got {dim}",
        )


def _lora_sync(generator: GeneratorConfig) -> str:
    """A LoRA policy's weight sync. 'auto' is 'merged': on the CPU, vLLM's LoRA path generated
    2-3x slower, which outweighed the faster sync at both sizes measured (tiny; Qwen2-0.5B
    shape: 1.4 s merged vs 0.05 s adapter sync, 108 vs 55 tokens/s; BENCHMARKS.md, "LoRA
    weight sync")."""
    return "merged" if generator.lora_sync == "auto" else generator.lora_sync


def reward_scorers(reward: ModelConfig, checked: dict | None = None) -> dict:
    """The reward's scorers as {name: RewardScorerConfig}, in order: `checked` (the scorers
    key, built by _check_scorers) or else a single model_path as the scorer 'model' and a
    reward_fn as the scorer 'reward_fn', both with weight 1, so the older configs keep their
    meaning (model score + function score)."""
    if checked is not None:
        return dict(checked)
    out = {}
    if reward.model_path:
        out["model"] = RewardScorerConfig(
            model_path=reward.model_path, trust_remote_code=reward.trust_remote_code
        )
    if reward.reward_fn:
        out["reward_fn"] = RewardScorerConfig(reward_fn=reward.reward_fn)
    return out


# ----------------------------------------------------------------------------- DeepSpeed


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


# Keys rlhf_pipe sets itself (from trainer_config / train_config); a user value would be ignored.
OWNED_DEEPSPEED_KEYS = (
    "optimizer",
    "scheduler",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "managed_gradient_accumulation",
)


def deepspeed_problem(role: str, tc) -> tuple[str, str] | None:
    """(sub-key, message) for a deepspeed_config rlhf_pipe cannot honour, else None.
    `role` is the model_configs name: policy, critic, reference or reward. Pure: no I/O."""
    ds = tc.deepspeed_config
    trained = role in ("policy", "critic")
    for key in OWNED_DEEPSPEED_KEYS:
        if key in ds:
            return key, (
                "set by rlhf_pipe (lr, betas, eps, weight_decay, lr_warmup_steps from "
                "trainer_config; batch sizes from train_config): remove it"
            )
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return "zero_optimization", f"expected a dict, got {zero!r}"
    stage = zero.get("stage", 0)
    allowed = (2, 3) if trained else (3,)
    if stage not in allowed or isinstance(stage, bool):
        why = (
            ""
            if trained
            else ": a forward-only model has no gradients or optimizer "
            "state to partition, only weights (ZeRO-3)"
        )
        return "zero_optimization.stage", (
            f"expected {' or '.join(map(str, allowed))}{why}, got {stage!r}"
        )
    if (ds.get("fp16") or {}).get("enabled"):
        return "fp16.enabled", (
            "fp16 needs dynamic loss scaling, which the batch normaliser "
            "(carried as the loss scale) excludes: use bf16"
        )
    bf16 = bool((ds.get("bf16") or {}).get("enabled"))
    if bf16 != (tc.torch_dtype == "bfloat16"):
        return "bf16.enabled", (
            f"is {bf16}, but trainer_config.torch_dtype is "
            f"{tc.torch_dtype!r}: set both to bf16 or neither"
        )
    if trained and "gradient_clipping" in ds:
        clip = ds["gradient_clipping"]
        if clip != (tc.max_grad_norm or 0.0):
            return "gradient_clipping", (
                f"{clip!r} differs from trainer_config.max_grad_norm="
                f"{tc.max_grad_norm!r}: give it once, in max_grad_norm"
            )
    return None


# ----------------------------------------------------------------------------- loading


def from_dict(raw: dict, source: str = "<config>", check_paths: bool = True) -> RunConfig:
    """Build and validate a RunConfig from a plain dict (the config file's top-level names);
    the derived values are in its `plan`."""
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
    return dataclasses.replace(cfg, _plan=validate(cfg, check_paths))


def load_config(
    path: str | os.PathLike, overrides: dict | None = None, check_paths: bool = True
) -> RunConfig:
    """Load a Python config file. `overrides` maps dotted keys to values (CLI --set);
    check_paths=False skips the checks against this machine (see the module docstring)."""
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
    return from_dict(raw, source=path, check_paths=check_paths)


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
