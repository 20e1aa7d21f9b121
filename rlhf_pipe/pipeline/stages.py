"""One PPO step as four stage threads joined by bounded channels.

```
prompts -> [Generate] --completions--> [Forward] --micro-batches--> [Advantage] --> [Train]
             vLLM streams             ref | reward | critic | actor    KL, (norm), GAE   grads
             finished requests        (concurrent, per micro-batch)                     accumulate
after the last micro-batch: one optimizer step per model (then the trainer syncs weights)
```

Micro-batches form in completion order: micro-batch i is the i-th group of `pipe_micro_bs`
samples to finish (replayed samples from the relay buffer are finished already and come first;
a 'dynamic' step may hold more than PIPE_MICRO_BATCH_NUM micro-batches). PIPE_MICRO_BATCH_NUM = 1
is the serial baseline. Each stage records its busy intervals so the trainer can report
busy/idle seconds and draw the timeline.
"""

from __future__ import annotations

import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from rlhf_pipe.pipeline.batch import MicroBatch, Sample, pad_field, unpad_into
from rlhf_pipe.pipeline.channel import END, Channel, PipelineAborted, StageTimeout
from rlhf_pipe.ppo import core
from rlhf_pipe.ppo import group as group_algos
from rlhf_pipe.roles import LossSettings
from rlhf_pipe.roles import grad_divisor as _grad_divisor
from rlhf_pipe.rollout.types import Completion, SamplingSettings

STAGES = ("generate", "forward", "advantage", "train")


class NonFiniteError(FloatingPointError):
    """NaN or inf in a reward or an update, caught in the step that made it."""


class StageError(RuntimeError):
    """The first failure of a step, naming its stage."""


@dataclass(frozen=True)
class AdvantageSettings:
    kl_coeff: float
    kl_estimator: str
    gamma: float
    gae_lambda: float
    clip_reward_min: float | None
    clip_reward_max: float | None
    norm_rewards: object  # "running" | "batch" | False
    algorithm: str = "ppo"  # "ppo" | "grpo" | "rloo" | "reinforce_pp"
    kl_mode: str = "reward"  # "reward" | "loss"
    group_size: int = 1  # rollout n: answers per prompt
    on_nonfinite: str = "stop"
    group_std: str = "unbiased"  # grpo: "unbiased" (n - 1) | "population" (n)
    advantage_whiten: object = False  # ppo: False | "batch" | "micro_batch"


@dataclass
class StepPlan:
    """What one step needs beyond the roles: sizes, settings and the prompts."""

    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    seeds: list[int]
    sampling: SamplingSettings
    pipe_micro_bs: int
    samples_per_step: int
    advantage: AdvantageSettings
    loss: LossSettings
    update_actor: bool
    ppo_epochs: int = 1
    num_mini_batches: int = 1
    on_policy_version: int | None = None
    timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    ptx_token_ids: list[list[int]] | None = None
    ptx_weight: float = 0.0
    on_nonfinite: str = "stop"  # "stop" | "skip"
    # False: the Forward stage skips the actor. Valid when one update per batch keeps the
    # weights those log-probs would come from, and no KL in the reward needs them before Train:
    # the Train stage's own log-probs (detached) stand for them (roles.PolicyRole.train).
    actor_forward: bool = True
    # Replayed samples (the relay buffer): finished completions that enter the Forward stage
    # before any fresh one. Their sample ids follow the fresh ones; samples_per_step counts them.
    relay: list[Completion] = field(default_factory=list)


@dataclass
class StepOutput:
    samples: list[Sample]
    train_metrics: dict
    timeline: list[tuple[str, int, float, float]]  # (stage, micro-batch, start, end), seconds
    wall_s: float
    extra: dict = field(default_factory=dict)
    t0: float = 0.0  # perf_counter seconds at the timeline's 0 (to line steps up in time)


class _Run:
    """Threads of one step: the first error aborts the rest and is re-raised by join()."""

    def __init__(self):
        self.abort = threading.Event()
        self.error: tuple[str, BaseException, str] | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.t0 = time.perf_counter()
        self.timeline: list[tuple[str, int, float, float]] = []
        self.counters: dict[str, int] = {}

    def spawn(self, name: str, fn) -> None:
        def body():
            try:
                fn()
            except PipelineAborted:
                pass
            except BaseException as e:
                with self._lock:
                    if self.error is None:
                        self.error = (name, e, traceback.format_exc())
                self.abort.set()

        t = threading.Thread(target=body, name=f"rlhf_pipe-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def record(self, stage: str, mb: int, start: float) -> None:
        with self._lock:
            self.timeline.append((stage, mb, start - self.t0, time.perf_counter() - self.t0))

    def join(self, timeout_s: float, grace_s: float = 5.0) -> None:
        """Wait for every thread. After the first error, wait at most `grace_s` more: a thread
        blocked in user code (a reward function, a model) is left behind as a daemon and
        stops at its next channel operation."""
        deadline = time.monotonic() + timeout_s
        error_seen_at = None
        while any(t.is_alive() for t in self._threads):
            now = time.monotonic()
            if self.error is not None:
                error_seen_at = error_seen_at or now
                if now - error_seen_at > grace_s:
                    break
            elif now > deadline:
                alive = [t.name for t in self._threads if t.is_alive()]
                self.abort.set()
                self.error = (
                    "pipeline",
                    StageTimeout(
                        f"step did not finish within {timeout_s:.0f} s; still running: {alive}"
                    ),
                    "",
                )
                break
            time.sleep(0.02)
        if self.error is not None:
            stage, exc, _ = self.error
            raise StageError(f"stage '{stage}' failed: {type(exc).__name__}: {exc}") from exc


class StepPipeline:
    """Runs one step through the stages. Roles are objects with the methods of
    rlhf_pipe.roles (or remote proxies with the same methods)."""

    def __init__(
        self, engine, actor, critic, reference, reward, tokenizer, pad_id: int, on_event=None
    ):
        self.engine, self.actor, self.critic = engine, actor, critic
        self.reference, self.reward = reference, reward
        self.tokenizer, self.pad_id = tokenizer, pad_id
        self.running = core.RunningMoments()
        self.on_event = on_event or (lambda stage, mb: None)
        # Forward calls of the four models run side by side.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rlhf_pipe-fwd")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ stages

    def _generate(
        self, run: _Run, plan: StepPlan, out: Channel, source: Channel | None = None
    ) -> None:
        start = time.perf_counter()
        # Replayed samples are complete already: Forward works on them while vLLM generates.
        for c in plan.relay:
            out.put(c)
        if source is not None:  # generated by the run-ahead thread (run_ahead.py)
            deadline = time.monotonic() + plan.timeout_s + plan.request_timeout_s
            while True:
                try:  # short waits, so a failure of this step stops the relay too
                    item = source.get(timeout_s=0.5)
                except PipelineAborted:  # the generation thread failed (RunAhead.error)
                    raise RuntimeError("the run-ahead generation thread stopped") from None
                except StageTimeout:
                    if run.abort.is_set():
                        raise PipelineAborted("run-ahead source") from None
                    if time.monotonic() > deadline:
                        raise
                    continue
                if item is END:
                    break
                out.put(item)
        elif plan.prompt_ids:  # a fixed-size step may be all replay
            indices = list(range(len(plan.prompt_ids)))
            self.engine.generate(plan.prompt_ids, indices, plan.sampling, plan.seeds, out)
        run.record("generate", -1, start)
        out.close()

    def _forward(self, run: _Run, plan: StepPlan, inp: Channel, out: Channel) -> None:
        pending: list[Completion] = []
        index = 0
        seen: set[int] = set()
        gen_start = time.perf_counter()
        while True:
            item = inp.get(timeout_s=plan.request_timeout_s)
            if item is not END:
                if item.sample_id in seen:
                    raise RuntimeError(f"sample {item.sample_id} produced twice")
                seen.add(item.sample_id)
                pending.append(item)
            if len(pending) == plan.pipe_micro_bs or (item is END and pending):
                run.record("gen_mb", index, gen_start)
                self.on_event("generate", index)
                start = time.perf_counter()
                mb = MicroBatch(index, [self._to_sample(c, plan) for c in pending])
                self._forward_models(mb.samples, run, index, plan.actor_forward)
                run.record("forward", index, start)
                self.on_event("forward", index)
                out.put(mb)
                index, pending, gen_start = index + 1, [], time.perf_counter()
            if item is END:
                break
        if len(seen) != plan.samples_per_step:
            raise RuntimeError(
                f"generation produced {len(seen)} samples, expected {plan.samples_per_step}"
            )
        out.close()

    def _to_sample(self, c: Completion, plan: StepPlan) -> Sample:
        return Sample(
            sample_id=c.sample_id,
            prompt_index=c.prompt_index,
            version=c.version,
            prompt_ids=torch.tensor(c.prompt_ids, dtype=torch.long),
            response_ids=torch.tensor(c.response_ids, dtype=torch.long),
            prompt_text=plan.prompt_texts[c.prompt_index],
            response_text=self.tokenizer.decode(c.response_ids, skip_special_tokens=True),
            finish_reason=c.finish_reason,
            relay_from=c.extra.get("relay_from"),
            prompt_logprobs=c.prompt_logprobs,
            # A replayed sample's behaviour policy is an earlier run's: it gets no correction.
            behaviour_logp=(
                torch.tensor(c.behaviour_logprobs, dtype=torch.float32)
                if c.behaviour_logprobs is not None and c.extra.get("relay_from") is None
                else None
            ),
        )

    def _forward_models(
        self, samples: list[Sample], run: _Run, index: int, actor_forward: bool = True
    ) -> None:
        def call(role: str, fn):  # each model's share of the stage, for the role rows
            def timed():
                start = time.perf_counter()
                try:
                    return fn(samples)
                finally:
                    run.record(f"{role}.forward", index, start)

            return self._pool.submit(timed)

        jobs = {"score": call("reward", self.reward.scores)}
        if actor_forward:
            jobs["old_logp"] = call("actor", self.actor.logprobs)
        if self.reference is not None:
            jobs["ref_logp"] = call("reference", self.reference.logprobs)
        if self.critic is not None:
            jobs["values"] = call("critic", self.critic.values)
        for name, job in jobs.items():
            for s, value in zip(samples, job.result()):
                if name == "score":  # (1 + K,): the weighted total, then each scorer's score
                    s.score, s.score_parts = value[0], value[1:]
                else:
                    setattr(s, name, value)

    def _advantage(self, run: _Run, plan: StepPlan, inp: Channel, out: Channel) -> None:
        a = plan.advantage
        # Whole-batch statistics (exact 'batch' normalisation, REINFORCE++ whitening) need every
        # sample of the step; group baselines need every answer of a prompt. Micro-batches wait
        # in `held` until what they need is there, and leave in order. A group algorithm with
        # 'batch' normalises over the whole batch before its group baselines, so it waits too.
        whole_batch = (
            "batch" in (a.norm_rewards, a.advantage_whiten) or a.algorithm == "reinforce_pp"
        )
        grouped = a.algorithm in ("grpo", "rloo")
        held: list[MicroBatch] = []
        groups: dict[int, list[Sample]] = {}
        waited = 0
        for mb in inp:
            held.append(mb)
            if whole_batch:
                continue
            if grouped:
                _shape_scores(mb.samples, a, batch_norm=False)
                for s in mb.samples:
                    groups.setdefault(s.prompt_index, []).append(s)
            while held and (
                not grouped
                or all(len(groups[s.prompt_index]) == a.group_size for s in held[0].samples)
            ):
                ready = held.pop(0)
                start = time.perf_counter()
                self._advantages(ready.samples, a, groups)
                run.record("advantage", ready.index, start)
                out.put(ready)
            waited += len(held)
        if held:
            start = time.perf_counter()
            every = sorted((s for mb in held for s in mb.samples), key=lambda s: s.sample_id)
            if grouped and whole_batch:  # 'batch': groups fill once every score is here
                _shape_scores(every, a, batch_norm=a.norm_rewards == "batch")
                for s in every:
                    groups.setdefault(s.prompt_index, []).append(s)
            self._advantages(every, a, groups)
            run.record("advantage", -1, start)
            for mb in held:
                out.put(mb)
        run.counters["advantage_waits"] = waited
        out.close()

    def _advantages(
        self, samples: list[Sample], a: AdvantageSettings, groups: dict[int, list[Sample]]
    ) -> None:
        R = max(max(s.num_actions for s in samples), 1)
        mask = pad_field_mask(samples, R)
        scores = torch.stack([_filled(s.score, "score") for s in samples]).float()  # (b,)
        bad = [s.sample_id for s, ok in zip(samples, torch.isfinite(scores)) if not ok]
        if bad and a.on_nonfinite == "stop":
            raise NonFiniteError(
                f"non-finite reward for samples {bad[:5]}; weights unchanged. "
                f"Set train_config.on_nonfinite='skip' to skip such updates"
            )
        if a.clip_reward_min is not None or a.clip_reward_max is not None:
            scores = scores.clamp(min=a.clip_reward_min, max=a.clip_reward_max)
        if a.norm_rewards == "running":
            self.running.update(scores)
            scores = core.normalize(scores, self.running.mean, self.running.std)
        elif a.norm_rewards == "batch":
            scores = core.normalize(scores, scores.mean(), scores.std(unbiased=False))
        has_kl = samples[0].ref_logp is not None and samples[0].old_logp is not None
        if has_kl:
            kl = (
                core.kl_penalty(
                    pad_field(samples, "old_logp", R),
                    pad_field(samples, "ref_logp", R),
                    a.kl_estimator,
                )
                * mask
            )
        else:  # no reference, or no actor forward (then KL is not in the reward)
            kl = torch.zeros_like(mask)
        kl_coeff = a.kl_coeff if a.kl_mode == "reward" else 0.0
        rewards = core.token_rewards(scores, kl, mask, kl_coeff, None, None)
        if a.algorithm == "ppo":
            values = pad_field(samples, "values", R)
            adv, ret = core.gae_advantages(rewards, values, mask, a.gamma, a.gae_lambda)
            if a.advantage_whiten:  # over the samples of this call: the batch or one micro-batch
                adv = core.masked_whiten(adv, mask) * mask  # returns stay unwhitened
        elif a.algorithm == "reinforce_pp":
            adv = group_algos.reinforce_pp_advantages(rewards, mask, a.gamma)
            ret = torch.zeros_like(adv)
        else:
            adv = group_algos.broadcast_to_tokens(self._group_advantages(samples, a, groups), mask)
            ret = torch.zeros_like(adv)
        if has_kl:
            unpad_into(samples, "kl", kl)
        unpad_into(samples, "token_rewards", rewards)
        unpad_into(samples, "advantages", adv)
        unpad_into(samples, "returns", ret)

    @staticmethod
    def _group_advantages(
        samples: list[Sample], a: AdvantageSettings, groups: dict[int, list[Sample]]
    ) -> torch.Tensor:
        """(b,) advantages of `samples`, each against its whole group. Members are ordered by
        sample id, so the arithmetic is the same however the groups were split."""
        out = torch.empty(len(samples))
        for prompt_index in {s.prompt_index for s in samples}:
            members = sorted(groups[prompt_index], key=lambda s: s.sample_id)
            scores = torch.stack([_filled(s.shaped_score, "shaped_score") for s in members])
            ids = torch.zeros(len(members), dtype=torch.long)
            adv = (
                group_algos.grpo_advantages(scores, ids, unbiased=a.group_std == "unbiased")
                if a.algorithm == "grpo"
                else group_algos.rloo_advantages(scores, ids)
            )
            by_id = {m.sample_id: v for m, v in zip(members, adv)}
            for i, s in enumerate(samples):
                if s.prompt_index == prompt_index:
                    out[i] = by_id[s.sample_id]
        return out

    def _train(self, run: _Run, plan: StepPlan, inp: Channel, result: dict) -> None:
        streaming = plan.ppo_epochs * plan.num_mini_batches == 1
        got: list[Sample] = []
        metrics: dict = {}
        for mb in inp:
            self._check_versions(mb.samples, plan)
            got.extend(mb.samples)
            if streaming:
                start = time.perf_counter()
                _merge(
                    metrics, self._train_on(mb.samples, plan, plan.samples_per_step, run, mb.index)
                )
                run.record("train", mb.index, start)
                self.on_event("train", mb.index)
        if len(got) != plan.samples_per_step:
            raise RuntimeError(
                f"train stage got {len(got)} samples, expected {plan.samples_per_step}"
            )
        start = time.perf_counter()
        if streaming:
            _merge(metrics, self._finish(plan, got))
        else:
            # Several updates per batch: mini-batches are contiguous in completion order.
            for _ in range(plan.ppo_epochs):
                for k, mini in enumerate(_split(got, plan.num_mini_batches)):
                    _merge(metrics, self._train_on(mini, plan, len(mini), run, k))
                    _merge(metrics, self._finish(plan, mini))
        run.record("optimizer", -1, start)
        result["samples"] = got
        result["metrics"] = metrics

    def _train_on(self, samples, plan: StepPlan, num_samples: int, run: _Run, index: int) -> dict:
        metrics: dict = {}
        if plan.update_actor:
            start = time.perf_counter()
            _merge(metrics, self.actor.train(samples, plan.loss, num_samples))
            run.record("actor.train", index, start)
        if self.critic is not None:
            start = time.perf_counter()
            _merge(metrics, self.critic.train(samples, plan.loss, num_samples))
            run.record("critic.train", index, start)
        return metrics

    def _finish(self, plan: StepPlan, samples: list[Sample]) -> dict:
        divisor = _grad_divisor(plan.loss.loss_agg, sum(s.num_actions for s in samples))
        models, ptx_metrics = {}, {}
        if plan.update_actor:
            if plan.ptx_token_ids:
                # Added after the policy gradient is normalised, with its own normaliser.
                self.actor.divide_grads(divisor)
                ptx_metrics = self.actor.ptx(plan.ptx_token_ids, plan.ptx_weight)
                models["actor"] = (self.actor, 1.0)
            else:
                models["actor"] = (self.actor, divisor)
        if self.critic is not None:
            models["critic"] = (self.critic, divisor)
        norms = {name: role.prepare_step(d) for name, (role, d) in models.items()}
        # Host sync, once per optimizer step: both models update, or neither does.
        bad = {n: v.item() for n, v in norms.items() if v is not None and not torch.isfinite(v)}
        if bad:
            for role, _ in models.values():
                role.drop_grads()
            where = ", ".join(f"{n} gradient norm {v}" for n, v in bad.items())
            if plan.on_nonfinite == "skip":
                return {"nonfinite_skipped": torch.tensor(1.0)}
            raise NonFiniteError(
                f"non-finite update ({where}); weights unchanged. Set "
                f"train_config.on_nonfinite='skip' to skip such updates"
            )
        metrics = dict(ptx_metrics)
        for name, (role, _) in models.items():
            if norms[name] is not None:
                metrics.update({f"{name}/{k}": v for k, v in role.apply_step(norms[name]).items()})
        return metrics

    @staticmethod
    def _check_versions(samples: list[Sample], plan: StepPlan) -> None:
        if plan.on_policy_version is None:
            return
        # A replayed sample was generated by an older policy, but the Forward stage took its
        # old log-probs and values from the current models, which is what PPO's ratio needs.
        stale = [
            s.sample_id
            for s in samples
            if s.relay_from is None and s.version != plan.on_policy_version
        ]
        if stale:
            raise RuntimeError(
                f"on-policy check: samples {stale[:5]} were generated by a policy "
                f"version other than {plan.on_policy_version}"
            )

    # ------------------------------------------------------------------ driver

    def run(self, plan: StepPlan, source: Channel | None = None) -> StepOutput:
        """One step. `source`: the step's completions, generated elsewhere (max_staleness >= 1:
        the run-ahead thread); the Generate stage then only relays them, after any replay."""
        run = _Run()
        # Bounded: generation may run at most one step's worth ahead of the Forward stage;
        # between the later stages two micro-batches in flight are enough to overlap.
        gen_q = Channel("generate->forward", plan.samples_per_step, run.abort, plan.timeout_s)
        fwd_q = Channel("forward->advantage", 2, run.abort, plan.timeout_s)
        adv_q = Channel("advantage->train", plan.samples_per_step, run.abort, plan.timeout_s)
        result: dict = {}
        run.spawn("generate", lambda: self._generate(run, plan, gen_q, source))
        run.spawn("forward", lambda: self._forward(run, plan, gen_q, fwd_q))
        run.spawn("advantage", lambda: self._advantage(run, plan, fwd_q, adv_q))
        run.spawn("train", lambda: self._train(run, plan, adv_q, result))
        run.join(plan.timeout_s + plan.request_timeout_s)
        return StepOutput(
            result["samples"],
            result["metrics"],
            run.timeline,
            time.perf_counter() - run.t0,
            dict(run.counters),
            run.t0,
        )


def _filled(value: torch.Tensor | None, name: str) -> torch.Tensor:
    """A Sample field an earlier stage fills; None here is a bug in the stage order."""
    if value is None:
        raise RuntimeError(f"Sample.{name} is not set yet")
    return value


def _shape_scores(samples: list[Sample], a: AdvantageSettings, batch_norm: bool) -> None:
    """Sets each sample's grpo/rloo score: clipped, with batch_norm normalised over `samples`
    (the whole batch, sorted by sample id, as _advantages normalises PPO scores), then minus
    the summed KL when KL is in the reward. The group baseline is taken from these."""
    scores = torch.stack([_filled(s.score, "score") for s in samples]).float()  # (b,)
    if a.clip_reward_min is not None or a.clip_reward_max is not None:
        scores = scores.clamp(min=a.clip_reward_min, max=a.clip_reward_max)
    if batch_norm:
        scores = core.normalize(scores, scores.mean(), scores.std(unbiased=False))
    for s, score in zip(samples, scores):
        if a.kl_mode == "reward" and a.kl_coeff and s.ref_logp is not None:
            kl = core.kl_penalty(_filled(s.old_logp, "old_logp"), s.ref_logp, a.kl_estimator).sum()
            score = score - a.kl_coeff * kl
        s.shaped_score = score


def pad_field_mask(samples: list[Sample], width: int) -> torch.Tensor:
    mask = torch.zeros((len(samples), width), dtype=torch.float32)
    for i, s in enumerate(samples):
        mask[i, : s.num_actions] = 1
    return mask


def _split(items: list, parts: int) -> list[list]:
    """`parts` contiguous pieces whose sizes differ by at most one (a dynamic step's sample
    count need not divide by num_mini_batches)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return [p for p in out if p]


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        into[k] = into[k] + v if k in into and not k.endswith(("grad_norm", "lr")) else v
