"""The single-process trainer: builds the roles from a RunConfig and runs PPO steps.

One step reads as named, timed phases:

    relay     = relay_sample_fn(past episodes)        # host, optional: replayed samples
    prompts   = data.next_batch()                    # host, ranked by length if asked
    output    = pipeline.run(plan)                    # generate | forward | advantage | train
    sync      = engine.load_weights(actor weights)    # new policy version into vLLM
    metrics   -> console, JSONL, TensorBoard          # the one host sync of the step

Every stage is a thread here; the distributed runner keeps this control and moves the roles
onto their own ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from rlhf_pipe import lora
from rlhf_pipe.checkpoint import STATE_FILE, CheckpointError, resolve_resume, write_checkpoint
from rlhf_pipe.config import ConfigError, RunConfig, metric_loggers, reward_scorers
from rlhf_pipe.data import (
    DataError,
    PromptSource,
    RatioSampler,
    RelayBuffer,
    parse_dataset_spec,
    rank_by_length,
    read_records,
)
from rlhf_pipe.metrics import MetricsLogger, StageProgress
from rlhf_pipe.models import (
    check_tokenizer_matches,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
    load_value_model,
)
from rlhf_pipe.pipeline.run_ahead import RunAhead, staleness_metrics
from rlhf_pipe.pipeline.stages import STAGES, AdvantageSettings, StepOutput, StepPipeline, StepPlan
from rlhf_pipe.protocols import MODEL_ROLES, Role, WeightSync
from rlhf_pipe.roles import (
    CriticRole,
    LossSettings,
    PolicyRole,
    ReferenceRole,
    RewardRole,
    Scorer,
    choose_packing,
)
from rlhf_pipe.rollout.types import Completion, SamplingSettings
from rlhf_pipe.run_dir import RunDir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_function(name: str, what: str = "reward_fn"):
    """'package.module:function' -> the function, with a one-line error if it is not there."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what} {name!r}: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{what} {name!r}: {module_name} has no function {attr!r}")
    return fn


def _pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("placement_config.device: 'cuda' asked for, but no GPU is visible")
    return torch.device(choice)


def request_seed(base: int, step: int, prompt_index: int) -> int:
    """Per-request sampling seed: generation is reproducible whatever the batching."""
    return (base * 1_000_003 + step * 10_007 + prompt_index) % (2**31 - 1)


def sampling_settings(r, evaluation: bool = False) -> SamplingSettings:
    """rollout_config -> what the engine is asked for (evaluation: eval_* values, n = 1)."""
    pick = lambda name: (
        getattr(r, name)
        if not evaluation or getattr(r, f"eval_{name}") is None
        else getattr(r, f"eval_{name}")
    )
    return SamplingSettings(
        r.max_new_tokens,
        pick("temperature"),
        pick("top_p"),
        pick("top_k"),
        1 if evaluation else r.n,
        r.ignore_eos,
        tuple(x for x in (r.stop_token_list or "").split(";") if x),
        use_beam_search=r.use_beam_search,
        beam_width=max(r.beam_width or r.n, 1) if r.use_beam_search else None,
        max_seq_len=None if r.new_token_limit else r.max_model_len,
        prompt_logprobs=r.prompt_logprobs,
        length_range=tuple(r.response_length_range) if r.response_length_range else None,
    )


def build_roles(
    cfg: RunConfig, names, pad_id: int, device, reward_fn=None, dp_groups: dict | None = None
) -> dict:
    """The named roles as models in this process (the ones the config has). A role with a
    deepspeed_config runs under DeepSpeed (rlhf_pipe.zero) on its `dp_groups` group; a plain
    role on several ranks all-reduces its gradients on it."""
    t, mc = cfg.train_config, cfg.model_configs
    sizes = dict(
        infer_micro_bs=t.infer_micro_bs,
        train_micro_bs=t.train_micro_bs,
        logit_chunk_tokens=t.logit_chunk_tokens,
    )
    groups = dp_groups or {}
    offload = cfg.placement_config.ref_reward_offload  # not for ZeRO-3: it is partitioned
    roles: dict = {}
    for name in map(Role, names):
        if name == Role.ACTOR or (name == Role.CRITIC and mc.critic is not None):
            actor = name == Role.ACTOR
            mcfg = mc.policy if actor else mc.critic
            loader = load_causal_lm if actor else load_value_model
            model = loader(
                mcfg.model_path,
                mcfg.trainer_config.torch_dtype,
                mcfg.trust_remote_code,
                name.config_key,
            )
            if mcfg.trainer_config.enable_lora:
                model = lora.apply_lora(model, mcfg.trainer_config, cfg.source, name.config_key)
            role_cls, zero_cls = (
                (PolicyRole, "ZeroPolicyRole") if actor else (CriticRole, "ZeroCriticRole")
            )
            extra = {"lora_sync": lora.sync_mode(cfg) or "merged"} if actor else {}
            roles[name] = _trained_role(
                role_cls,
                zero_cls,
                model.to(device),
                pad_id,
                mcfg.trainer_config,
                sizes,
                device,
                groups.get(name),
                packed=choose_packing(model, t.pack_sequences, name, cfg.source),
                **extra,
            )
        elif name == Role.REFERENCE and mc.reference is not None:
            ref = mc.reference
            model = load_causal_lm(
                ref.model_path, ref.trainer_config.torch_dtype, ref.trust_remote_code, "reference"
            ).to(device)
            packed = choose_packing(model, t.pack_sequences, name, cfg.source)
            ds = _deepspeed(ref.trainer_config, t, device, groups.get(name), trained=False)
            if ds is None:
                roles[name] = ReferenceRole(
                    model,
                    pad_id,
                    t.infer_micro_bs,
                    offload=offload,
                    packed=packed,
                    logit_chunk_tokens=t.logit_chunk_tokens,
                )
            else:
                from rlhf_pipe.zero import ZeroReferenceRole

                roles[name] = ZeroReferenceRole(
                    model,
                    pad_id,
                    t.infer_micro_bs,
                    ds_config=ds,
                    dp_group=groups.get(name),
                    packed=packed,
                )
        elif name == Role.REWARD:
            scorers = build_scorers(cfg, device)
            packed_scorers = {
                sc.name
                for sc in scorers
                if sc.kind == "model"
                and choose_packing(
                    sc.impl, t.pack_sequences, f"reward scorer {sc.name}", cfg.source
                )
            }
            ds = _deepspeed(mc.reward.trainer_config, t, device, groups.get(name), trained=False)
            if ds is None:
                roles[name] = RewardRole(scorers, pad_id, t.infer_micro_bs, offload, packed_scorers)
            else:
                from rlhf_pipe.zero import ZeroRewardRole

                roles[name] = ZeroRewardRole(
                    scorers,
                    pad_id,
                    t.infer_micro_bs,
                    ds_config=ds,
                    dp_group=groups.get(name),
                    packed_scorers=packed_scorers,
                )
            if reward_fn is not None:
                roles[name].set_function(reward_fn)
    return roles


def _deepspeed(tc, t, device, dp_group, trained: bool) -> dict | None:
    """The DeepSpeed engine config of a role, or None without a deepspeed_config."""
    if not tc.deepspeed_config:
        return None
    import torch.distributed as dist

    from rlhf_pipe import zero

    zero.ensure_process_group(torch.device(device))
    dp = dist.get_world_size(group=dp_group) if dp_group is not None else 1
    return zero.engine_config(tc.deepspeed_config, tc, t.train_micro_bs, dp, trained)


def _trained_role(plain_cls, zero_cls: str, model, pad_id, tc, sizes, device, dp_group, **extra):
    """`extra`: the role class's own arguments (packed, lora_sync)."""
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    kw = dict(
        lr=tc.lr,
        betas=tc.betas,
        eps=tc.eps,
        weight_decay=tc.weight_decay,
        warmup_steps=tc.lr_warmup_steps,
        max_grad_norm=tc.max_grad_norm,
        dp_group=dp_group,
        **sizes,
        **extra,
    )
    ds = _deepspeed(tc, SimpleNamespace(**sizes), device, dp_group, trained=True)
    if ds is None:
        return plain_cls(model, pad_id, **kw)
    from rlhf_pipe import zero

    return getattr(zero, zero_cls)(model, pad_id, ds_config=ds, **kw)


def build_scorers(cfg: RunConfig, device) -> list[Scorer]:
    """The reward's scorers from model_configs.reward (see config.reward_scorers)."""
    from rlhf_pipe.rewards.http import HTTPRewardModel

    rw = cfg.model_configs.reward
    out = []
    for name, sc in reward_scorers(rw).items():
        if sc.model_path:
            what = "reward" if name == "model" and rw.scorers is None else f"reward scorer {name}"
            model = load_value_model(
                sc.model_path, rw.trainer_config.torch_dtype, sc.trust_remote_code, what
            ).to(device)
            out.append(Scorer(name, sc.weight, "model", model))
        elif sc.url:
            out.append(
                Scorer(
                    name,
                    sc.weight,
                    "remote",
                    HTTPRewardModel(
                        name,
                        sc.url,
                        batch_size=sc.batch_size,
                        timeout_s=sc.timeout_s,
                        max_retries=sc.max_retries,
                        backoff_s=sc.backoff_s,
                        token_env=sc.token_env,
                    ),
                )
            )
        else:
            out.append(Scorer(name, sc.weight, "function", resolve_function(sc.reward_fn)))
    return out


def build_vllm_engine(
    cfg: RunConfig,
    engine_index: int = 0,
    in_process: bool = True,
    nccl_weight_sync: bool = False,
    visible_devices: str | None = None,
):
    from rlhf_pipe.rollout.vllm_engine import VLLMEngine

    r, gen = cfg.rollout_config, cfg.model_configs.policy.generator_config
    return VLLMEngine(
        cfg.model_configs.policy.model_path,
        dtype=r.dtype,
        seed=r.seed,
        max_model_len=r.max_model_len,
        tensor_parallel_size=gen.parallel.tensor.get("size", 1),
        gpu_memory_utilization=r.gpu_memory_utilization,
        enforce_eager=r.enforce_eager,
        engine_kwargs=r.engine_kwargs,
        engine_index=engine_index,
        in_process=in_process,
        nccl_weight_sync=nccl_weight_sync,
        visible_devices=visible_devices,
        lora=lora.engine_lora(cfg),
    )


class RLHFTrainer:
    """Build once from a RunConfig, then `learn()`. See docs/architecture.md."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        reward_fn=None,
        engine=None,
        console: bool = True,
        roles: dict | None = None,
        in_process_engine: bool = True,
        weight_sync: WeightSync | None = None,
    ):
        self.cfg = cfg
        t, mc = cfg.train_config, cfg.model_configs
        seed_everything(t.seed)
        self.device = _pick_device(cfg.placement_config.device)
        tok_path = cfg.tokenizer_config.tokenizer_path or mc.policy.model_path
        self.tokenizer = load_tokenizer(tok_path, cfg.tokenizer_config.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id

        check_tokenizer_matches(
            mc.policy.model_path,
            tok_path,
            "policy",
            cfg.tokenizer_config.trust_remote_code,
            self.tokenizer,
        )
        # Data first: a bad prompt file is reported before any model or engine is built.
        pd = cfg.prompt_dataset_config
        specs = [parse_dataset_spec(s, cfg.constants) for s in pd.message_datasets]
        self.batch_generation = mc.policy.generator_config.batch_generation
        self.prompts = PromptSource(
            specs,
            self.tokenizer,
            pd.samples_each_epoch,
            pd.max_len,
            pd.prompt_key,
            pd.shuffle,
            pd.seed,
            min_len=self.batch_generation.min_prompt_length,
        )
        self.relay = RelayBuffer(t.max_relay_episode, t.relay_episode_offset)
        self.relay_sample_fn = None
        if t.relay_sample_fn:
            self.relay_sample_fn = resolve_function(
                t.relay_sample_fn, f"{cfg.source}: train_config.relay_sample_fn"
            )
        if roles is None:
            roles = build_roles(cfg, MODEL_ROLES, self.pad_id, self.device, reward_fn)
        elif reward_fn is not None:
            roles["reward"].set_function(reward_fn)
        self.actor, self.critic = roles["actor"], roles.get("critic")
        self.reference, self.reward = roles.get("reference"), roles["reward"]
        self.engine = engine or self._build_engine(in_process_engine)
        self.ptx = self._build_ptx()
        self.eval_prompts = None
        if cfg.eval_dataset_config is not None:
            ed = cfg.eval_dataset_config
            self.eval_prompts = PromptSource(
                [parse_dataset_spec(s, cfg.constants) for s in ed.message_datasets],
                self.tokenizer,
                ed.samples_each_epoch,
                ed.max_len,
                ed.prompt_key,
                False,
                ed.seed,
            )
        self.pipeline = StepPipeline(
            self.engine,
            self.actor,
            self.critic,
            self.reference,
            self.reward,
            self.tokenizer,
            self.pad_id,
        )
        self.version = 0
        self.step_index = 0
        # None: the actor's named_weights into engine.load_weights; else the NCCL broadcast.
        self.weight_sync = weight_sync
        self.last_sync: dict = {}  # the last weight sync's {seconds, bytes, gbps}
        self.work_dir = Path(t.work_dir)
        # The folder is claimed (rlhf_pipe/run_dir.py) when the run first writes to it, in
        # learn() or save(): a trainer that only runs steps (the bench) leaves it alone, and
        # resume(), called before, tells the claim which run this continues.
        self._console = console
        self._resumed: tuple[int, Path | None] | None = None  # (step, checkpoint)
        self.run_dir: RunDir | None = None
        self.logger: MetricsLogger | None = None  # opened with the claim
        self.history: list[dict] = []
        # max_staleness >= 1: the generation thread, started by the first step (run_ahead.py);
        # what a checkpoint had in flight waits here until then.
        self.run_ahead: RunAhead | None = None
        self._run_ahead_state: dict | None = None
        if t.max_staleness and weight_sync is not None:
            raise ConfigError(
                f"{cfg.source}: train_config.max_staleness >= 1 needs the engine's own "
                f"load_weights (an in-process or RemoteEngine); the NCCL/gloo weight_sync "
                f"broadcast is not supported with run-ahead yet"
            )

    # ------------------------------------------------------------------ Python API

    @classmethod
    def from_config(cls, path: str, overrides: dict | None = None, **kwargs) -> RLHFTrainer:
        """`RLHFTrainer.from_config("cfg.py", {"train_config.max_train_step": 5}).learn()`."""
        from rlhf_pipe.config import load_config

        return cls(load_config(path, overrides), **kwargs)

    def set_reward_fn(self, fn) -> None:
        """Score with `fn(prompts, responses) -> list[float]` instead of the configured reward
        function (model and remote scorers, if configured, still add their scores)."""
        self.reward.set_function(fn)

    def set_prompts(self, prompts: list[str]) -> None:
        """Train on these prompt texts (rendered with the chat template when there is one)."""
        import json
        import tempfile

        if not prompts:
            raise ValueError("set_prompts: the list is empty")
        path = Path(tempfile.mkdtemp(prefix="rlhf_pipe_prompts_")) / "prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        pd = self.cfg.prompt_dataset_config
        self.prompts = PromptSource(
            [parse_dataset_spec(str(path))],
            self.tokenizer,
            pd.samples_each_epoch,
            pd.max_len,
            "prompt",
            pd.shuffle,
            pd.seed,
            min_len=self.batch_generation.min_prompt_length,
        )

    def set_relay_sample_fn(self, fn) -> None:
        """Replay past samples with `fn(episode_relay_buffers) -> list[dict]` instead of the
        configured train_config.relay_sample_fn. It is called before each step with the kept
        episodes (`EpisodeRelayBuffer`s, oldest first); see README "Stream data and the relay
        buffer"."""
        if not self.relay.enabled:
            raise ValueError(
                "set_relay_sample_fn: the relay is off "
                "(train_config.max_relay_episode is 0); set it to -1 or >= 1"
            )
        self.relay_sample_fn = fn

    def reward_names(self) -> list[str]:
        """Scorer names in the order of Sample.score_parts (a remote reward role has the
        configured ones)."""
        return list(self.reward.names)

    # ------------------------------------------------------------------ building

    def _build_engine(self, in_process: bool = True):
        mc = self.cfg.model_configs
        gen = mc.policy.generator_config
        if gen.generator_type == "hf":
            from rlhf_pipe.rollout.hf_engine import HFEngine

            actor_model = self.actor.model  # the hf engine lives beside the actor (placement)
            # A LoRA actor's copy is merged: this engine then loads merged weights by HF name.
            model = (
                lora.merged_copy(actor_model)
                if lora.has_lora(actor_model)
                else copy.deepcopy(actor_model)
            )
            return HFEngine(
                model,
                self.pad_id,
                self.tokenizer.eos_token_id,
                chunk_size=self.cfg.train_config.infer_micro_bs,
            )
        return build_vllm_engine(self.cfg, 0, in_process)

    def _build_ptx(self):
        p = self.cfg.pretrain_dataset_config
        if p is None or self.cfg.train_config.pretrain_loss_weight == 0:
            return None
        specs = [parse_dataset_spec(s, self.cfg.constants) for s in p.message_datasets]
        texts = []  # per dataset
        for spec in specs:
            texts.append([])
            for where, rec in read_records(spec.path):
                if p.text_key not in rec:
                    raise DataError(f"{spec.path}:{where}: missing field {p.text_key!r}")
                ids = self.tokenizer(str(rec[p.text_key]), add_special_tokens=False)["input_ids"]
                if len(ids) > 1:
                    texts[-1].append(ids[: p.max_len])
            if not texts[-1]:
                raise DataError(
                    f"{spec.path}: no usable pretrain text (every record is shorter than 2 tokens)"
                )
        # Mixed by ratio like the prompts; in file order, as before, so one file cycles.
        sampler = RatioSampler([len(x) for x in texts], [s.ratio for s in specs], False, p.seed)
        return {"texts": texts, "sampler": sampler, "batch": p.samples_each_epoch}

    def _next_ptx(self):
        if self.ptx is None:
            return None
        return [self.ptx["texts"][i][j] for i, j in self.ptx["sampler"].take(self.ptx["batch"])]

    # ------------------------------------------------------------------ relay

    def _relay_items(self) -> list[dict]:
        """What relay_sample_fn returns for this step, checked (nothing before any episode is
        kept)."""
        if self.relay_sample_fn is None or not self.relay.episodes:
            return []
        items = self.relay_sample_fn(list(self.relay.episodes))
        if not isinstance(items, (list, tuple)):
            raise ValueError(
                f"relay_sample_fn: expected a list of sample dicts, got {type(items).__name__}"
            )

        def token_ids(v, empty_ok):
            return (
                isinstance(v, (list, tuple))
                and (empty_ok or len(v) > 0)
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            )

        for j, d in enumerate(items):
            if not (
                isinstance(d, dict)
                and token_ids(d.get("prompt_ids"), False)
                and token_ids(d.get("response_ids"), True)
            ):
                raise ValueError(
                    f"relay_sample_fn: item {j}: expected a dict with token id "
                    f"lists 'prompt_ids' (non-empty) and 'response_ids', as in "
                    f"the episode buffers"
                )
        return list(items)

    def _relay_completions(
        self, items: list[dict], first_prompt: int, first_id: int
    ) -> tuple[list[Completion], list[str]]:
        """Replayed samples as Completions numbered after the fresh ones. The answers of one
        past prompt (same episode_id and prompt_index) share a new prompt index, so grpo/rloo
        see them as one group."""
        index: dict = {}
        texts: list[str] = []
        out = []
        for j, d in enumerate(items):
            key = (d.get("episode_id"), d["prompt_index"]) if "prompt_index" in d else j
            if key not in index:
                index[key] = first_prompt + len(texts)
                texts.append(d.get("prompt_text") or self.tokenizer.decode(d["prompt_ids"]))
            out.append(
                Completion(
                    first_id + j,
                    index[key],
                    list(d["prompt_ids"]),
                    list(d["response_ids"]),
                    d.get("finish_reason"),
                    d.get("version", -1),
                    extra={"relay_from": d.get("episode_id", -1)},
                )
            )
        rep, n = self.cfg.repeater_config, self.cfg.rollout_config.n
        if rep.algorithm in ("grpo", "rloo"):
            sizes = {}
            for c in out:
                sizes[c.prompt_index] = sizes.get(c.prompt_index, 0) + 1
            short = [v for v in sizes.values() if v != n]
            if short:
                raise ValueError(
                    f"relay_sample_fn: algorithm {rep.algorithm!r} needs whole "
                    f"groups of n={n} answers per prompt, got a group of "
                    f"{short[0]} (return every answer of a prompt, with its "
                    f"episode_id and prompt_index)"
                )
        return out, texts

    def _episode_buffer(self, step: int, samples) -> list[dict]:
        """The samples generated in this step, as the relay buffer keeps them (in sample-id
        order, so the buffer does not depend on completion order)."""
        fresh = sorted((s for s in samples if s.relay_from is None), key=lambda s: s.sample_id)
        if not fresh:
            return []
        scores = torch.stack([s.score for s in fresh]).float().tolist()  # one host sync
        return [
            dict(
                episode_id=step,
                sample_id=s.sample_id,
                prompt_index=s.prompt_index,
                prompt_ids=s.prompt_ids.tolist(),
                response_ids=s.response_ids.tolist(),
                prompt_text=s.prompt_text,
                response_text=s.response_text,
                finish_reason=s.finish_reason,
                version=s.version,
                score=score,
            )
            for s, score in zip(fresh, scores)
        ]

    # ------------------------------------------------------------------ one step

    def _plan(self, step: int, relay_now: bool = True) -> StepPlan:
        cfg, t, r, rep = (
            self.cfg,
            self.cfg.train_config,
            self.cfg.rollout_config,
            self.cfg.repeater_config,
        )
        # Replayed samples first: in 'fixed' mode they take the place of fresh prompts.
        # (relay_now=False: planned ahead by the run-ahead thread; _with_relay adds them.)
        relay = self._relay_items() if relay_now else []
        num_prompts = cfg.prompt_dataset_config.samples_each_epoch
        if relay and t.stream_data_loader_type == "fixed":
            if len(relay) > cfg.samples_per_step or len(relay) % r.n:
                raise ValueError(
                    f"relay_sample_fn returned {len(relay)} samples; a 'fixed' step holds "
                    f"{cfg.samples_per_step} and replayed samples replace whole prompts of "
                    f"n={r.n} answers (or set train_config.stream_data_loader_type='dynamic' "
                    f"to add them on top)"
                )
            num_prompts -= len(relay) // r.n
        prompts = self.prompts.next_batch(num_prompts)
        if self.batch_generation.ranking:
            prompts = rank_by_length(prompts)
        replayed, relay_texts = self._relay_completions(relay, len(prompts), len(prompts) * r.n)
        return StepPlan(
            prompt_ids=[p.ids for p in prompts],
            prompt_texts=[p.text for p in prompts] + relay_texts,
            seeds=[request_seed(r.seed, step, p.index) for p in prompts],
            sampling=sampling_settings(r),
            pipe_micro_bs=t.pipe_micro_bs,
            samples_per_step=len(prompts) * r.n + len(replayed),
            relay=replayed,
            advantage=AdvantageSettings(
                rep.kl_coeff,
                rep.kl_estimator,
                rep.gamma,
                rep.gae_lambda,
                rep.clip_reward_min,
                rep.clip_reward_max,
                rep.norm_rewards,
                rep.algorithm,
                rep.kl_mode,
                r.n,
                t.on_nonfinite,
                group_std=rep.group_std,
                advantage_whiten=rep.advantage_whiten,
            ),
            loss=LossSettings(
                t.policy_clip,
                t.value_clip,
                t.ppo_loss_weight,
                t.value_loss_weight,
                t.loss_agg,
                rep.kl_coeff if rep.kl_mode == "loss" else 0.0,
                dual_clip_c=t.dual_clip_c,
            ),
            update_actor=step >= t.critic_warmup_step,
            ppo_epochs=t.ppo_epochs,
            num_mini_batches=t.num_mini_batches,
            on_policy_version=self.version if t.on_policy else None,
            timeout_s=t.stage_timeout_s,
            request_timeout_s=r.request_timeout_s,
            ptx_token_ids=self._next_ptx(),
            ptx_weight=t.pretrain_loss_weight,
            on_nonfinite=t.on_nonfinite,
            actor_forward=self._actor_forward_needed(),
        )

    def _actor_forward_needed(self) -> bool:
        """Whether the Forward stage must run the actor (see StepPlan.actor_forward)."""
        t, rep = self.cfg.train_config, self.cfg.repeater_config
        return not (
            t.skip_redundant_actor_forward
            and t.ppo_epochs * t.num_mini_batches == 1
            and (rep.kl_mode == "loss" or not rep.kl_coeff)
        )

    def train_step(self) -> dict:
        step = self.step_index
        t = self.cfg.train_config
        start = time.perf_counter()
        plan, source = self._take_ahead(step) if t.max_staleness else (self._plan(step), None)
        # A dynamic step may hold more than PIPE_MICRO_BATCH_NUM micro-batches.
        progress = StageProgress(
            step, math.ceil(plan.samples_per_step / plan.pipe_micro_bs), t.progress_bar
        )
        self.pipeline.on_event = progress
        try:
            out = self.pipeline.run(plan) if source is None else self.pipeline.run(plan, source)
        finally:
            progress.close()
        sync_start = time.perf_counter()
        skipped = "nonfinite_skipped" in out.train_metrics
        trained_at = self.version
        updated = plan.update_actor and not skipped
        if updated:
            self.version += 1
        if self.run_ahead is not None:  # the generation thread loads them between two steps
            weights = self.actor.named_weights() if updated else None
            self.run_ahead.publish(step, self.version, weights)
        elif updated:
            self._sync_weights()
        sync_s = time.perf_counter() - sync_start
        if self.relay.enabled:
            self.relay.add(step, self._episode_buffer(step, out.samples))
        metrics = self._step_metrics(out, plan, time.perf_counter() - start, sync_s)
        metrics.update(staleness_metrics(out.samples, trained_at, t.max_staleness))
        self.step_index += 1
        return metrics

    # ------------------------------------------------------------------ run-ahead

    def _take_ahead(self, step: int):
        """max_staleness >= 1: step `step`'s plan, with this step's replayed samples, and the
        channel its completions arrive on from the generation thread (started here once)."""
        t = self.cfg.train_config
        if self.run_ahead is None:
            self.run_ahead = RunAhead(
                self.engine,
                t.max_staleness,
                lambda j: self._plan(j, relay_now=False),
                step,
                t.stage_timeout_s + self.cfg.rollout_config.request_timeout_s,
                self._run_ahead_state,
            )
            self._run_ahead_state = None
        plan, channel = self.run_ahead.take(step)
        relay = self._relay_items()
        n = len(plan.prompt_ids) * self.cfg.rollout_config.n
        replayed, texts = self._relay_completions(relay, len(plan.prompt_ids), n)
        plan = dataclasses.replace(
            plan,
            relay=replayed,
            prompt_texts=plan.prompt_texts + texts,
            samples_per_step=plan.samples_per_step + len(replayed),
            on_policy_version=None,  # the staleness bound stands for it
        )
        return plan, channel

    def _step_metrics(self, out: StepOutput, plan: StepPlan, step_s: float, sync_s: float):
        samples = out.samples
        tokens = sum(s.num_actions for s in samples)
        m: dict = {"policy_version": self.version}
        # Reward tracks the current policy: replayed samples (chosen from the past, often for
        # their reward) are left out of it.
        fresh = [s for s in samples if s.relay_from is None] or samples
        scores = torch.stack([s.score for s in fresh])
        m["reward"] = scores.mean()
        m["reward_std"] = scores.std(unbiased=False)
        if samples[0].score_parts is not None:  # each scorer's own mean, before its weight
            parts = torch.stack([s.score_parts for s in samples]).mean(0)
            for name, value in zip(self.reward_names(), parts.unbind(0)):
                m[f"reward/{name}"] = value
        m["response_len"] = tokens / len(samples)
        m["response_len_max"] = max(s.num_actions for s in samples)
        # Prompt + response tokens: what each model pass reads (the bench's MFU counts these).
        m["tokens/sequence"] = tokens + sum(len(s.prompt_ids) for s in samples)
        if samples[0].kl is not None:  # absent when the actor's forward was skipped
            kl = torch.cat([s.kl for s in samples])
            m["kl"] = kl.mean() if kl.numel() else 0.0
        m["advantages"] = torch.cat([s.advantages for s in samples]).mean()
        m["returns"] = torch.cat([s.returns for s in samples]).mean()
        tm = out.train_metrics
        actor_tokens = tm.get("tokens")
        if actor_tokens is not None:
            m["actor/policy_loss"] = tm["policy_loss"] / actor_tokens
            m["actor/clip_frac"] = tm["clip_frac"] / actor_tokens
            m["actor/approx_kl"] = tm["approx_kl"] / actor_tokens
            m["entropy"] = tm["entropy"] / actor_tokens
        if "critic_tokens" in tm:
            m["critic/value_loss"] = tm["value_loss"] / tm["critic_tokens"]
            m["critic/clip_frac"] = tm["value_clip_frac"] / tm["critic_tokens"]
            m["critic/values"] = tm["values"] / tm["critic_tokens"]
        if "kl_loss" in tm:
            m["actor/kl_loss"] = tm["kl_loss"] / actor_tokens
        m["advantage_waits"] = out.extra.get("advantage_waits", 0)
        if "ptx_tokens" in tm:
            m["actor/ptx_loss"] = tm["ptx_loss"] / tm["ptx_tokens"]
        for k, v in tm.items():
            if k.endswith(("grad_norm", "/lr")):
                m[k] = v
        busy = {s: 0.0 for s in STAGES}
        for stage, _, t0, t1 in out.timeline:
            if stage in busy:
                busy[stage] += t1 - t0
        for stage, seconds in busy.items():
            m[f"busy_s/{stage}"] = seconds
            m[f"idle_frac/{stage}"] = max(0.0, 1.0 - seconds / out.wall_s)
        m["pipeline_s"] = out.wall_s
        m["step_s"] = step_s
        m["samples_per_s"] = len(samples) / step_s
        m["gen_tokens_per_s"] = tokens / max(busy["generate"], 1e-9)
        m["sync/seconds"] = sync_s
        if self.last_sync:
            m["sync/gbps"] = self.last_sync["gbps"]
            m["sync/bytes"] = self.last_sync["bytes"]
        for name, role in zip(MODEL_ROLES, (self.actor, self.critic, self.reference, self.reward)):
            # Roles on other ranks: their calls since the last step's metrics (the weight
            # sync's among them), seconds seen from here and, of those, inside the method.
            seconds = role.take_call_seconds() if role is not None else None
            if seconds is not None:
                m[f"remote/{name}/call_s"], m[f"remote/{name}/on_rank_s"] = seconds
        m["skipped_prompts"] = sum(self.prompts.skipped.values())
        m["samples"] = len(samples)
        m["relay_samples"] = len(plan.relay)
        m["nonfinite_skipped"] = tm.get("nonfinite_skipped", 0.0)
        # The step's one device->host sync: every metric becomes a Python number here.
        m = {k: (v.item() if torch.is_tensor(v) else v) for k, v in m.items()}
        m["timeline"] = out.timeline
        return m

    def evaluate(self) -> dict:
        """Generate on the eval prompts with the eval sampling settings and score them."""
        from rlhf_pipe.pipeline.batch import Sample

        r = self.cfg.rollout_config
        if self.run_ahead is not None:  # the engine idle, holding the current weights
            self.run_ahead.quiesce()
        prompts = self.eval_prompts.next_batch()
        settings = sampling_settings(r, evaluation=True)
        done = []
        self.engine.generate(
            [p.ids for p in prompts],
            [p.index for p in prompts],
            settings,
            [request_seed(r.seed + 1, 0, p.index) for p in prompts],
            SimpleNamespace(put=done.append),
        )
        samples = [
            Sample(
                c.sample_id,
                c.prompt_index,
                c.version,
                torch.tensor(c.prompt_ids),
                torch.tensor(c.response_ids),
                prompts[c.prompt_index].text,
                self.tokenizer.decode(c.response_ids, skip_special_tokens=True),
            )
            for c in sorted(done, key=lambda c: c.sample_id)
        ]
        scores = torch.stack(self.reward.scores(samples))[:, 0]  # the total
        return {
            "eval/reward": scores.mean().item(),
            "eval/response_len": sum(s.num_actions for s in samples) / len(samples),
        }

    # ------------------------------------------------------------------ loop

    def learn(self, max_steps: int | None = None) -> list[dict]:
        t = self.cfg.train_config
        total = max_steps if max_steps is not None else t.max_train_step
        self._claim_work_dir()
        try:
            while self.step_index < total:
                metrics = self.train_step()
                step = self.step_index
                logged = {k: v for k, v in metrics.items() if k != "timeline"}
                if t.eval_interval and step % t.eval_interval == 0:
                    metrics.update(self.evaluate())
                    logged.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
                self.history.append(metrics)
                if step % t.log_interval == 0 or step == total:
                    self.logger.log(step, logged)
                if t.save_interval and step % t.save_interval == 0 and step != total:
                    self.save(step)
            self.save(self.step_index)
        finally:
            self.logger.close()
        return self.history

    def _claim_work_dir(self) -> None:
        """Take work_dir for this run, once: refused if it holds another run, unless resume()
        continued that one (then the killed run's lines after the checkpoint go)."""
        if self.run_dir is not None:
            return
        t = self.cfg.train_config
        step, checkpoint = self._resumed if self._resumed is not None else (None, None)
        self.run_dir = RunDir(self.work_dir, step, checkpoint)
        self.logger = MetricsLogger(
            self.work_dir,
            metric_loggers(t),
            self._console,
            t.wandb,
            purge_step=self.run_dir.purge_step,
        )

    def save(self, step: int) -> Path:
        self._claim_work_dir()

        def write(tmp: Path) -> None:
            self.actor.save(str(tmp / "actor"))
            self.tokenizer.save_pretrained(tmp / "actor")
            if self.critic is not None:
                self.critic.save(str(tmp / "critic"))
                self.tokenizer.save_pretrained(tmp / "critic")
            torch.save(self.state_dict(), tmp / STATE_FILE)

        return write_checkpoint(self.work_dir, step, write, self.cfg.train_config.keep_last)

    def state_dict(self) -> dict:
        """Everything besides model weights that the next step depends on."""
        if self.run_ahead is not None:  # in-flight steps complete, the data position after them
            self.run_ahead.quiesce()
        state = {
            "step": self.step_index,
            "version": self.version,
            "actor": self.actor.training_state(),
            "data": self.prompts.state_dict(),
            "ptx": self.ptx["sampler"].state_dict() if self.ptx else None,
            "relay": self.relay.state_dict(),
            "running_rewards": self.pipeline.running.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
        }
        if self.critic is not None:
            state["critic"] = self.critic.training_state()
        if self.run_ahead is not None:
            state["run_ahead"] = self.run_ahead.state_dict()
        elif self._run_ahead_state is not None:
            state["run_ahead"] = self._run_ahead_state
        return state

    def resume(self, checkpoint: str | Path) -> Path | None:
        """Continue a run: 'auto' takes the newest complete checkpoint in work_dir (none there:
        the run starts again at step 0), a path that checkpoint. Call it before learn(); the
        next step continues exactly, and metrics.jsonl keeps one line per step. Returns the
        checkpoint loaded, or None."""
        if self.run_dir is not None:
            raise CheckpointError("resume: call it before learn() or save()")
        path = resolve_resume(str(checkpoint), self.work_dir)
        if path is None:
            self._resumed = (0, None)
            return None
        state = torch.load(path / STATE_FILE, weights_only=False)
        for part, role in (("actor", self.actor), ("critic", self.critic)):
            if role is None:
                continue
            role.load_weights_from(str(path / part))
            try:  # by parameter name, into this run's layout (rlhf_pipe/optim_state.py)
                role.load_training_state(state[part])
            except CheckpointError as e:
                raise CheckpointError(f"{path / STATE_FILE}: {part}: {e}") from None
        self.prompts.load_state_dict(state["data"])
        if self.ptx:
            if "ptx" in state:
                self.ptx["sampler"].load_state_dict(state["ptx"])
            elif len(self.ptx["texts"]) == 1:  # written before PTX was mixed by ratio
                self.ptx["sampler"].load_state_dict({"pos": [state["ptx_pos"]], "pass": [0]})
        self.relay.load_state_dict(state.get("relay", {"episodes": []}))
        self.pipeline.running.load_state_dict(state["running_rewards"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step_index, self.version = state["step"], state["version"]
        ahead = state.get("run_ahead")
        s = self.cfg.train_config.max_staleness
        if ahead is not None and ahead["max_staleness"] != s:
            raise CheckpointError(
                f"{path}: written with train_config.max_staleness={ahead['max_staleness']}, "
                f"this run has {s}: its in-flight samples follow the other schedule"
            )
        self._run_ahead_state = ahead
        self._sync_weights()
        self._resumed = (self.step_index, path)
        return path

    def _sync_weights(self) -> None:
        """The actor's current weights into every engine, stamped with `self.version`."""
        if self.weight_sync is not None:
            self.last_sync = self.weight_sync(self.version)
        else:
            self.last_sync = self.engine.load_weights(self.actor.named_weights(), self.version)

    def close(self) -> None:
        if self.run_ahead is not None:
            self.run_ahead.close()
        self.pipeline.close()
        if self.logger is not None:
            self.logger.close()
        if self.run_dir is not None:
            self.run_dir.close()
