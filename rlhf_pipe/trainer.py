"""The single-process trainer: builds the roles from a RunConfig and runs PPO steps.

One step reads as named, timed phases:

    prompts   = data.next_batch()                    # host
    output    = pipeline.run(plan)                    # generate | forward | advantage | train
    sync      = engine.load_weights(actor weights)    # new policy version into vLLM
    metrics   -> console, JSONL, TensorBoard          # the one host sync of the step

Every stage is a thread here; the distributed runner keeps this control and moves the roles
onto their own ranks.
"""

from __future__ import annotations

import copy
import importlib
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from rlhf_pipe.checkpoint import STATE_FILE, write_checkpoint
from rlhf_pipe.config import ConfigError, RunConfig
from rlhf_pipe.data import PromptSource, parse_dataset_spec, read_records
from rlhf_pipe.metrics import MetricsLogger, StageProgress
from rlhf_pipe.models import (check_tokenizer_matches, enable_gradient_checkpointing,
                              load_causal_lm, load_tokenizer, load_value_model)
from rlhf_pipe.pipeline.stages import (STAGES, AdvantageSettings, StepOutput, StepPipeline,
                                       StepPlan)
from rlhf_pipe.roles import CriticRole, LossSettings, PolicyRole, ReferenceRole, RewardRole
from rlhf_pipe.rollout.types import SamplingSettings


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


ROLE_NAMES = ("actor", "critic", "reference", "reward")


def build_roles(cfg: RunConfig, names, pad_id: int, device, reward_fn=None,
                dp_groups: dict | None = None) -> dict:
    """The named roles as models in this process (the ones the config has). A role with a
    deepspeed_config runs under DeepSpeed (rlhf_pipe.zero) on its `dp_groups` group."""
    t, mc = cfg.train_config, cfg.model_configs
    sizes = dict(infer_micro_bs=t.infer_micro_bs, train_micro_bs=t.train_micro_bs)
    groups = dp_groups or {}
    roles = {}
    for name in names:
        if name == "actor":
            pol = mc.policy
            model = load_causal_lm(pol.model_path, pol.trainer_config.torch_dtype,
                                   pol.trust_remote_code, "policy").to(device)
            roles[name] = _trained_role(PolicyRole, "ZeroPolicyRole", model, pad_id,
                                        pol.trainer_config, sizes, device, groups.get(name))
        elif name == "critic" and mc.critic is not None:
            c = mc.critic
            model = load_value_model(c.model_path, c.trainer_config.torch_dtype,
                                     c.trust_remote_code, "critic").to(device)
            roles[name] = _trained_role(CriticRole, "ZeroCriticRole", model, pad_id,
                                        c.trainer_config, sizes, device, groups.get(name))
        elif name == "reference" and mc.reference is not None:
            ref = mc.reference
            model = load_causal_lm(ref.model_path, ref.trainer_config.torch_dtype,
                                   ref.trust_remote_code, "reference").to(device)
            ds = _deepspeed(ref.trainer_config, t, device, groups.get(name), trained=False)
            if ds is None:
                roles[name] = ReferenceRole(model, pad_id, t.infer_micro_bs)
            else:
                from rlhf_pipe.zero import ZeroReferenceRole
                roles[name] = ZeroReferenceRole(model, pad_id, t.infer_micro_bs, ds_config=ds,
                                                dp_group=groups.get(name))
        elif name == "reward":
            rw = mc.reward
            model = ds = None
            if rw.model_path:
                model = load_value_model(rw.model_path, rw.trainer_config.torch_dtype,
                                         rw.trust_remote_code, "reward").to(device)
                ds = _deepspeed(rw.trainer_config, t, device, groups.get(name), trained=False)
            fn = reward_fn or (resolve_function(rw.reward_fn) if rw.reward_fn else None)
            if ds is None:
                roles[name] = RewardRole(model, pad_id, t.infer_micro_bs, fn)
            else:
                from rlhf_pipe.zero import ZeroRewardRole
                roles[name] = ZeroRewardRole(model, pad_id, t.infer_micro_bs, fn, ds_config=ds,
                                             dp_group=groups.get(name))
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


def _trained_role(plain_cls, zero_cls: str, model, pad_id, tc, sizes, device, dp_group):
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    kw = dict(lr=tc.lr, betas=tc.betas, eps=tc.eps, weight_decay=tc.weight_decay,
              warmup_steps=tc.lr_warmup_steps, max_grad_norm=tc.max_grad_norm, **sizes)
    ds = _deepspeed(tc, SimpleNamespace(**sizes), device, dp_group, trained=True)
    if ds is None:
        return plain_cls(model, pad_id, **kw)
    from rlhf_pipe import zero
    return getattr(zero, zero_cls)(model, pad_id, ds_config=ds, dp_group=dp_group, **kw)


def build_vllm_engine(cfg: RunConfig, engine_index: int = 0, in_process: bool = True):
    from rlhf_pipe.rollout.vllm_engine import VLLMEngine

    r, gen = cfg.rollout_config, cfg.model_configs.policy.generator_config
    return VLLMEngine(cfg.model_configs.policy.model_path, dtype=r.dtype, seed=r.seed,
                      max_model_len=r.max_model_len,
                      tensor_parallel_size=gen.parallel.tensor.get("size", 1),
                      gpu_memory_utilization=r.gpu_memory_utilization,
                      enforce_eager=r.enforce_eager, engine_kwargs=r.engine_kwargs,
                      engine_index=engine_index, in_process=in_process)


class RLHFTrainer:
    """Build once from a RunConfig, then `learn()`. See docs/architecture.md."""

    def __init__(self, cfg: RunConfig, *, reward_fn=None, engine=None, console: bool = True,
                 roles: dict | None = None, in_process_engine: bool = True):
        self.cfg = cfg
        t, mc = cfg.train_config, cfg.model_configs
        seed_everything(t.seed)
        self.device = _pick_device(cfg.placement_config.device)
        tok_path = cfg.tokenizer_config.tokenizer_path or mc.policy.model_path
        self.tokenizer = load_tokenizer(tok_path, cfg.tokenizer_config.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id

        check_tokenizer_matches(mc.policy.model_path, tok_path, "policy",
                                cfg.tokenizer_config.trust_remote_code, self.tokenizer)
        # Data first: a bad prompt file is reported before any model or engine is built.
        pd = cfg.prompt_dataset_config
        specs = [parse_dataset_spec(s, cfg.constants) for s in pd.message_datasets]
        self.prompts = PromptSource(specs, self.tokenizer, pd.samples_each_epoch, pd.max_len,
                                    pd.prompt_key, pd.shuffle, pd.seed)
        if roles is None:
            roles = build_roles(cfg, ROLE_NAMES, self.pad_id, self.device, reward_fn)
        elif reward_fn is not None:
            roles["reward"].reward_fn = reward_fn
        self.actor, self.critic = roles["actor"], roles.get("critic")
        self.reference, self.reward = roles.get("reference"), roles["reward"]
        actor_model = getattr(self.actor, "model", None)
        self.engine = engine or self._build_engine(actor_model, in_process_engine)
        self.ptx = self._build_ptx()
        self.eval_prompts = None
        if cfg.eval_dataset_config is not None:
            ed = cfg.eval_dataset_config
            self.eval_prompts = PromptSource(
                [parse_dataset_spec(s, cfg.constants) for s in ed.message_datasets],
                self.tokenizer, ed.samples_each_epoch, ed.max_len, ed.prompt_key, False, ed.seed)
        self.pipeline = StepPipeline(self.engine, self.actor, self.critic, self.reference,
                                     self.reward, self.tokenizer, self.pad_id)
        self.version = 0
        self.step_index = 0
        self.work_dir = Path(t.work_dir)
        self.logger = MetricsLogger(self.work_dir, t.tensorboard, console)
        self.history: list[dict] = []

    # ------------------------------------------------------------------ Python API

    @classmethod
    def from_config(cls, path: str, overrides: dict | None = None, **kwargs) -> "RLHFTrainer":
        """`RLHFTrainer.from_config("cfg.py", {"train_config.max_train_step": 5}).learn()`."""
        from rlhf_pipe.config import load_config

        return cls(load_config(path, overrides), **kwargs)

    def set_reward_fn(self, fn) -> None:
        """Score with `fn(prompts, responses) -> list[float]` instead of the configured reward
        function (a reward model, if configured, still adds its score)."""
        self.reward.reward_fn = fn

    def set_prompts(self, prompts: list[str]) -> None:
        """Train on these prompt texts (rendered with the chat template when there is one)."""
        import json
        import tempfile

        if not prompts:
            raise ValueError("set_prompts: the list is empty")
        path = Path(tempfile.mkdtemp(prefix="rlhf_pipe_prompts_")) / "prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        pd = self.cfg.prompt_dataset_config
        self.prompts = PromptSource([parse_dataset_spec(str(path))], self.tokenizer,
                                    pd.samples_each_epoch, pd.max_len, "prompt", pd.shuffle,
                                    pd.seed)

    # ------------------------------------------------------------------ building

    def _build_engine(self, actor_model, in_process: bool = True):
        r, mc = self.cfg.rollout_config, self.cfg.model_configs
        gen = mc.policy.generator_config
        if gen.generator_type == "hf":
            from rlhf_pipe.rollout.hf_engine import HFEngine

            return HFEngine(copy.deepcopy(actor_model), self.pad_id,
                            self.tokenizer.eos_token_id,
                            chunk_size=self.cfg.train_config.infer_micro_bs)
        return build_vllm_engine(self.cfg, 0, in_process)

    def _build_ptx(self):
        p = self.cfg.pretrain_dataset_config
        if p is None or self.cfg.train_config.pretrain_loss_weight == 0:
            return None
        texts = []
        for spec in (parse_dataset_spec(s, self.cfg.constants) for s in p.message_datasets):
            for where, rec in read_records(spec.path):
                if p.text_key not in rec:
                    raise ValueError(f"{spec.path}:{where}: missing field {p.text_key!r}")
                ids = self.tokenizer(str(rec[p.text_key]), add_special_tokens=False)["input_ids"]
                if len(ids) > 1:
                    texts.append(ids[:p.max_len])
        if not texts:
            raise ValueError("pretrain_dataset_config: no usable text")
        return {"texts": texts, "pos": 0, "batch": p.samples_each_epoch}

    def _next_ptx(self):
        if self.ptx is None:
            return None
        n, texts = self.ptx["batch"], self.ptx["texts"]
        out = [texts[(self.ptx["pos"] + i) % len(texts)] for i in range(n)]
        self.ptx["pos"] = (self.ptx["pos"] + n) % len(texts)
        return out

    # ------------------------------------------------------------------ one step

    def _plan(self, step: int) -> StepPlan:
        cfg, t, r, rep = self.cfg, self.cfg.train_config, self.cfg.rollout_config, self.cfg.repeater_config
        prompts = self.prompts.next_batch()
        stop = tuple(s for s in (r.stop_token_list or "").split(";") if s)
        return StepPlan(
            prompt_ids=[p.ids for p in prompts], prompt_texts=[p.text for p in prompts],
            seeds=[request_seed(r.seed, step, p.index) for p in prompts],
            sampling=SamplingSettings(r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.n,
                                      r.ignore_eos, stop),
            pipe_micro_bs=t.pipe_micro_bs, samples_per_step=cfg.samples_per_step,
            advantage=AdvantageSettings(rep.kl_coeff, rep.kl_estimator, rep.gamma,
                                        rep.gae_lambda, rep.clip_reward_min,
                                        rep.clip_reward_max, rep.norm_rewards, rep.algorithm,
                                        rep.kl_mode, r.n, t.on_nonfinite),
            loss=LossSettings(t.policy_clip, t.value_clip, t.ppo_loss_weight,
                              t.value_loss_weight, t.loss_agg,
                              rep.kl_coeff if rep.kl_mode == "loss" else 0.0),
            update_actor=step >= t.critic_warmup_step,
            ppo_epochs=t.ppo_epochs, num_mini_batches=t.num_mini_batches,
            on_policy_version=self.version if t.on_policy else None,
            timeout_s=t.stage_timeout_s, request_timeout_s=r.request_timeout_s,
            ptx_token_ids=self._next_ptx(), ptx_weight=t.pretrain_loss_weight,
            on_nonfinite=t.on_nonfinite)

    def train_step(self) -> dict:
        step = self.step_index
        t = self.cfg.train_config
        start = time.perf_counter()
        plan = self._plan(step)
        progress = StageProgress(step, self.cfg.pipe_micro_batch_num, t.progress_bar)
        self.pipeline.on_event = progress
        try:
            out = self.pipeline.run(plan)
        finally:
            progress.close()
        sync_start = time.perf_counter()
        skipped = "nonfinite_skipped" in out.train_metrics
        if plan.update_actor and not skipped:
            self.version += 1
            self.engine.load_weights(self.actor.named_weights(), self.version)
        sync_s = time.perf_counter() - sync_start
        metrics = self._step_metrics(out, plan, time.perf_counter() - start, sync_s)
        self.step_index += 1
        return metrics

    def _step_metrics(self, out: StepOutput, plan: StepPlan, step_s: float, sync_s: float):
        samples = out.samples
        tokens = sum(s.num_actions for s in samples)
        m: dict = {"policy_version": self.version}
        scores = torch.stack([s.score for s in samples])
        m["reward"] = scores.mean()
        m["reward_std"] = scores.std(unbiased=False)
        m["response_len"] = tokens / len(samples)
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
        if getattr(self.engine, "last_sync", None):
            m["sync/gbps"] = self.engine.last_sync["gbps"]
            m["sync/bytes"] = self.engine.last_sync["bytes"]
        m["skipped_prompts"] = sum(self.prompts.skipped.values())
        m["nonfinite_skipped"] = tm.get("nonfinite_skipped", 0.0)
        # The step's one device->host sync: every metric becomes a Python number here.
        m = {k: (v.item() if torch.is_tensor(v) else v) for k, v in m.items()}
        m["timeline"] = out.timeline
        return m

    def evaluate(self) -> dict:
        """Generate on the eval prompts with the eval sampling settings and score them."""
        from rlhf_pipe.pipeline.batch import Sample

        r = self.cfg.rollout_config
        prompts = self.eval_prompts.next_batch()
        settings = SamplingSettings(
            r.max_new_tokens, r.temperature if r.eval_temperature is None else r.eval_temperature,
            r.top_p if r.eval_top_p is None else r.eval_top_p,
            r.top_k if r.eval_top_k is None else r.eval_top_k, 1, r.ignore_eos,
            tuple(x for x in (r.stop_token_list or "").split(";") if x))
        done = []
        self.engine.generate([p.ids for p in prompts], [p.index for p in prompts], settings,
                             [request_seed(r.seed + 1, 0, p.index) for p in prompts],
                             SimpleNamespace(put=done.append))
        samples = [Sample(c.sample_id, c.prompt_index, c.version,
                          torch.tensor(c.prompt_ids), torch.tensor(c.response_ids),
                          prompts[c.prompt_index].text,
                          self.tokenizer.decode(c.response_ids, skip_special_tokens=True))
                   for c in sorted(done, key=lambda c: c.sample_id)]
        scores = torch.stack(self.reward.scores(samples))
        return {"eval/reward": scores.mean().item(),
                "eval/response_len": sum(s.num_actions for s in samples) / len(samples)}

    # ------------------------------------------------------------------ loop

    def learn(self, max_steps: int | None = None) -> list[dict]:
        t = self.cfg.train_config
        total = max_steps if max_steps is not None else t.max_train_step
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

    def save(self, step: int) -> Path:
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
        state = {
            "step": self.step_index, "version": self.version,
            "actor": self.actor.training_state(),
            "data": self.prompts.state_dict(),
            "ptx_pos": self.ptx["pos"] if self.ptx else 0,
            "running_rewards": self.pipeline.running.state_dict(),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state()},
        }
        if self.critic is not None:
            state["critic"] = self.critic.training_state()
        return state

    def resume(self, checkpoint: str | Path) -> None:
        """Load a checkpoint written by `save`; the next step continues exactly."""
        path = Path(checkpoint)
        state = torch.load(path / STATE_FILE, weights_only=False)
        self.actor.load_weights_from(str(path / "actor"))
        self.actor.load_training_state(state["actor"])
        if self.critic is not None:
            self.critic.load_weights_from(str(path / "critic"))
            self.critic.load_training_state(state["critic"])
        self.prompts.load_state_dict(state["data"])
        if self.ptx:
            self.ptx["pos"] = state["ptx_pos"]
        self.pipeline.running.load_state_dict(state["running_rewards"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step_index, self.version = state["step"], state["version"]
        self.engine.load_weights(self.actor.named_weights(), self.version)

    def close(self) -> None:
        self.pipeline.close()
