"""One step's metrics from its output: samples and stage timings in, a flat dict out.

Pure: no I/O and no role calls (the caller passes what the roles reported). Tensors stay
tensors until the end, where the step's one device->host sync turns them into numbers.
"""

from __future__ import annotations

import torch

from rlhf_pipe.pipeline.stages import STAGES, StepOutput, StepPlan


def step_metrics(
    out: StepOutput,
    plan: StepPlan,
    *,
    version: int,
    reward_names: list[str],
    step_s: float,
    sync_s: float,
    last_sync: dict,
    call_seconds: dict,
    skipped_prompts: int,
) -> dict:
    """`last_sync`: the last weight sync's {seconds, bytes, gbps}; `call_seconds`: role name ->
    (seconds seen from here, seconds on the role's rank) for roles on other ranks."""
    samples, tm = out.samples, out.train_metrics
    tokens = sum(s.num_actions for s in samples)
    m: dict = {"policy_version": version}
    m.update(_sample_metrics(samples, reward_names, tokens))
    m.update(_train_metrics(tm))
    m.update(_behaviour_metrics(tm, plan.ppo_epochs))
    m["advantage_waits"] = out.extra.get("advantage_waits", 0)
    if "ptx_tokens" in tm:
        m["actor/ptx_loss"] = tm["ptx_loss"] / tm["ptx_tokens"]
    m.update({k: v for k, v in tm.items() if k.endswith(("grad_norm", "/lr"))})
    m.update(_timing_metrics(out, step_s, len(samples), tokens))
    m["sync/seconds"] = sync_s
    if last_sync:
        m["sync/gbps"] = last_sync["gbps"]
        m["sync/bytes"] = last_sync["bytes"]
    for name, (call_s, on_rank_s) in call_seconds.items():
        m[f"remote/{name}/call_s"], m[f"remote/{name}/on_rank_s"] = call_s, on_rank_s
    m["skipped_prompts"] = skipped_prompts
    m["samples"] = len(samples)
    m["relay_samples"] = len(plan.relay)
    m["nonfinite_skipped"] = tm.get("nonfinite_skipped", 0.0)
    # The step's one device->host sync: every metric becomes a Python number here.
    m = {k: (v.item() if torch.is_tensor(v) else v) for k, v in m.items()}
    m["timeline"] = out.timeline
    return m


def _sample_metrics(samples, reward_names: list[str], tokens: int) -> dict:
    m: dict = {}
    # Reward tracks the current policy: replayed samples (chosen from the past, often for
    # their reward) are left out of it.
    fresh = [s for s in samples if s.relay_from is None] or samples
    scores = torch.stack([s.score for s in fresh])
    m["reward"] = scores.mean()
    m["reward_std"] = scores.std(unbiased=False)
    if samples[0].score_parts is not None:  # each scorer's own mean, before its weight
        parts = torch.stack([s.score_parts for s in samples]).mean(0)
        for name, value in zip(reward_names, parts.unbind(0)):
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
    return m


def _train_metrics(tm: dict) -> dict:
    """The train stage's sums, each divided by the token count it was summed over."""
    m: dict = {}
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
    return m


def _behaviour_metrics(tm: dict, ppo_epochs: int) -> dict:
    """vLLM's log-probs against the trainer's, and the IS weights of
    train_config.behaviour_correction (README, "Behaviour policy")."""
    m: dict = {}
    if "behaviour_tokens" not in tm:
        return m
    n_beh = tm["behaviour_tokens"].clamp_min(1)
    m["behaviour/logp_abs_diff"] = tm["behaviour_logp_abs_diff"] / n_beh
    m["behaviour/logp_diff"] = tm["behaviour_logp_diff"] / n_beh
    if "behaviour_is_weight" in tm:
        m["behaviour/is_weight_mean"] = tm["behaviour_is_weight"] / n_beh
        m["behaviour/truncated_frac"] = tm["behaviour_truncated"] / n_beh
        # One value per train chunk, summed over the ppo_epochs passes over that chunk.
        for key, pick in (("max", torch.max), ("min", torch.min)):
            vals = [v for k, v in tm.items() if k.startswith(f"behaviour_chunk_{key}/")]
            m[f"behaviour/is_weight_{key}"] = pick(torch.stack(vals)) / ppo_epochs
    return m


def _timing_metrics(out: StepOutput, step_s: float, num_samples: int, tokens: int) -> dict:
    m: dict = {}
    busy = {s: 0.0 for s in STAGES}
    for stage, _, t0, t1 in out.timeline:
        if stage in busy:
            busy[stage] += t1 - t0
    for stage, seconds in busy.items():
        m[f"busy_s/{stage}"] = seconds
        m[f"idle_frac/{stage}"] = max(0.0, 1.0 - seconds / out.wall_s)
    m["pipeline_s"] = out.wall_s
    m["step_s"] = step_s
    m["samples_per_s"] = num_samples / step_s
    m["gen_tokens_per_s"] = tokens / max(busy["generate"], 1e-9)
    return m
