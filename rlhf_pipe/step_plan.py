"""What one step runs: the prompts, the replayed samples and the PTX texts, as a StepPlan.

The planner reads the config sections it needs; the trainer hands it the data sources, whose
positions it advances (they are saved with the trainer's state, not here).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from rlhf_pipe.config import PretrainDatasetConfig, RepeaterConfig, RolloutConfig, TrainConfig
from rlhf_pipe.data import (
    DataError,
    PromptSource,
    RatioSampler,
    RelayBuffer,
    parse_dataset_spec,
    rank_by_length,
    read_records,
)
from rlhf_pipe.pipeline.batch import Sample
from rlhf_pipe.pipeline.stages import AdvantageSettings, StepPlan
from rlhf_pipe.roles import LossSettings
from rlhf_pipe.rollout.types import Completion, SamplingSettings


def request_seed(base: int, step: int, prompt_index: int) -> int:
    """Per-request sampling seed: generation is reproducible whatever the batching."""
    return (base * 1_000_003 + step * 10_007 + prompt_index) % (2**31 - 1)


def sampling_settings(
    r, evaluation: bool = False, behaviour_correction: str | None = None
) -> SamplingSettings:
    """rollout_config -> what the engine is asked for (evaluation: eval_* values, n = 1).
    `behaviour_correction`: train_config's, which decides whether the engine returns the
    sampled tokens' log-probs when rollout_config.behaviour_logprobs is None."""
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
        # Evaluation trains nothing: no correction to make.
        behaviour_logprobs=not evaluation and wants_behaviour_logprobs(r, behaviour_correction),
        request_seeds=r.request_seeds,
    )


def wants_behaviour_logprobs(r, behaviour_correction: str | None) -> bool:
    """rollout_config.behaviour_logprobs, where None means: when a correction uses them."""
    if r.behaviour_logprobs is None:
        return behaviour_correction is not None
    return bool(r.behaviour_logprobs)


def advantage_settings(rep: RepeaterConfig, n: int, on_nonfinite: str) -> AdvantageSettings:
    return AdvantageSettings(
        rep.kl_coeff,
        rep.kl_estimator,
        rep.gamma,
        rep.gae_lambda,
        rep.clip_reward_min,
        rep.clip_reward_max,
        rep.norm_rewards,
        rep.algorithm,
        rep.kl_mode,
        n,
        on_nonfinite,
        group_std=rep.group_std,
        advantage_whiten=rep.advantage_whiten,
    )


def loss_settings(t: TrainConfig, rep: RepeaterConfig) -> LossSettings:
    return LossSettings(
        t.policy_clip,
        t.value_clip,
        t.ppo_loss_weight,
        t.value_loss_weight,
        t.loss_agg,
        rep.kl_coeff if rep.kl_mode == "loss" else 0.0,
        dual_clip_c=t.dual_clip_c,
        behaviour_correction=t.behaviour_correction,
        behaviour_is_cap=t.behaviour_is_cap,
    )


def actor_forward_needed(t: TrainConfig, rep: RepeaterConfig) -> bool:
    """Whether the Forward stage must run the actor (see StepPlan.actor_forward)."""
    return not (
        t.skip_redundant_actor_forward
        and t.ppo_epochs * t.num_mini_batches == 1
        and (rep.kl_mode == "loss" or not rep.kl_coeff)
    )


@dataclass(frozen=True)
class StepSizes:
    """The step's sizes, derived from the config at validation."""

    num_prompts: int  # fresh prompts in a step without replayed samples
    samples_per_step: int  # num_prompts * n
    pipe_micro_bs: int  # samples per pipeline micro-batch


@dataclass
class PretrainMix:
    """PTX texts (token ids per dataset), mixed by ratio; `sampler` holds the position."""

    texts: list[list[list[int]]]
    sampler: RatioSampler
    batch: int

    def take(self) -> list[list[int]]:
        return [self.texts[i][j] for i, j in self.sampler.take(self.batch)]


def build_ptx(
    p: PretrainDatasetConfig | None, weight: float, tokenizer, constants
) -> PretrainMix | None:
    """The PTX mix of pretrain_dataset_config, or None when it is off (no config, weight 0)."""
    if p is None or weight == 0:
        return None
    specs = [parse_dataset_spec(s, constants) for s in p.message_datasets]
    texts: list[list[list[int]]] = []  # per dataset
    for spec in specs:
        texts.append([])
        for where, rec in read_records(spec.path):
            if p.text_key not in rec:
                raise DataError(f"{spec.path}:{where}: missing field {p.text_key!r}")
            ids = tokenizer(str(rec[p.text_key]), add_special_tokens=False)["input_ids"]
            if len(ids) > 1:
                texts[-1].append(ids[: p.max_len])
        if not texts[-1]:
            raise DataError(
                f"{spec.path}: no usable pretrain text (every record is shorter than 2 tokens)"
            )
    # Mixed by ratio like the prompts; in file order, as before, so one file cycles.
    sampler = RatioSampler([len(x) for x in texts], [s.ratio for s in specs], False, p.seed)
    return PretrainMix(texts, sampler, p.samples_each_epoch)


class StepPlanner:
    """Draws each step's prompts, replayed samples and PTX texts into a StepPlan."""

    def __init__(
        self,
        train: TrainConfig,
        rollout: RolloutConfig,
        repeater: RepeaterConfig,
        sizes: StepSizes,
        *,
        prompts: PromptSource,
        ranking: bool,
        relay: RelayBuffer,
        relay_sample_fn,
        ptx: PretrainMix | None,
        tokenizer,
    ):
        self.train, self.rollout, self.repeater, self.sizes = train, rollout, repeater, sizes
        self.prompts, self.ranking, self.ptx, self.tokenizer = prompts, ranking, ptx, tokenizer
        self.relay, self.relay_sample_fn = relay, relay_sample_fn

    def plan(self, step: int, version: int, relay_now: bool = True) -> StepPlan:
        """relay_now=False: planned ahead by the run-ahead thread (pipeline/run_ahead.py); the
        trainer adds the step's replayed samples when it trains it."""
        t, r, rep = self.train, self.rollout, self.repeater
        # Replayed samples first: in 'fixed' mode they take the place of fresh prompts.
        relay = self.relay_items() if relay_now else []
        num_prompts = self.sizes.num_prompts
        if relay and t.stream_data_loader_type == "fixed":
            if len(relay) > self.sizes.samples_per_step or len(relay) % r.n:
                raise ValueError(
                    f"relay_sample_fn returned {len(relay)} samples; a 'fixed' step holds "
                    f"{self.sizes.samples_per_step} and replayed samples replace whole prompts of "
                    f"n={r.n} answers (or set train_config.stream_data_loader_type='dynamic' "
                    f"to add them on top)"
                )
            num_prompts -= len(relay) // r.n
        prompts = self.prompts.next_batch(num_prompts)
        if self.ranking:
            prompts = rank_by_length(prompts)
        replayed, relay_texts = self.relay_completions(relay, len(prompts), len(prompts) * r.n)
        return StepPlan(
            prompt_ids=[p.ids for p in prompts],
            prompt_texts=[p.text for p in prompts] + relay_texts,
            seeds=[request_seed(r.seed, step, p.index) for p in prompts],
            sampling=sampling_settings(r, behaviour_correction=t.behaviour_correction),
            pipe_micro_bs=self.sizes.pipe_micro_bs,
            samples_per_step=len(prompts) * r.n + len(replayed),
            relay=replayed,
            advantage=advantage_settings(rep, r.n, t.on_nonfinite),
            loss=loss_settings(t, rep),
            update_actor=step >= t.critic_warmup_step,
            ppo_epochs=t.ppo_epochs,
            num_mini_batches=t.num_mini_batches,
            on_policy_version=version if t.on_policy else None,
            timeout_s=t.stage_timeout_s,
            request_timeout_s=r.request_timeout_s,
            ptx_token_ids=self.ptx.take() if self.ptx is not None else None,
            ptx_weight=t.pretrain_loss_weight,
            on_nonfinite=t.on_nonfinite,
            actor_forward=actor_forward_needed(t, rep),
        )

    def relay_items(self) -> list[dict]:
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

    def relay_completions(
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
        rep, n = self.repeater, self.rollout.n
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


def evaluate(engine, reward, tokenizer, eval_prompts: PromptSource, r: RolloutConfig) -> dict:
    """Generate on the next eval prompts with the eval sampling settings and score them."""
    prompts = eval_prompts.next_batch()
    done: list[Completion] = []
    engine.generate(
        [p.ids for p in prompts],
        [p.index for p in prompts],
        sampling_settings(r, evaluation=True),
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
            tokenizer.decode(c.response_ids, skip_special_tokens=True),
        )
        for c in sorted(done, key=lambda c: c.sample_id)
    ]
    scores = torch.stack(reward.scores(samples))[:, 0]  # the total
    return {
        "eval/reward": scores.mean().item(),  # host sync: once per evaluation
        "eval/response_len": sum(s.num_actions for s in samples) / len(samples),
    }


def episode_records(step: int, samples) -> list[dict]:
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
