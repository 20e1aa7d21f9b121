"""Every pair of the main switches' values, 2 steps each on the tiny config (issue 17).

Each case must either train, or be refused by validation with one line (a ConfigError, which
the CLI turns into exit code 2). Anything raised after start-up fails the test. The cases are
a pairwise covering array, built by `pairwise` below: every value of every switch meets every
value of every other switch in at least one case. One more switch is one more SWITCHES line.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import pytest
import torch

from rlhf_pipe.config import ConfigError
from tests.conftest import tiny_config

# The group algorithms answer n=4 times per prompt; 4 prompts keep the step at 16 samples.
_GROUP = {
    "model_configs.critic": None,
    "rollout_config.n": 4,
    "prompt_dataset_config.samples_each_epoch": 4,
}
_POLICY = "model_configs.policy."
_EVAL = object()  # stands for the eval dataset's path, known once the tiny assets are built

# name -> {value label: the overrides that set it}. A refusal case (REFUSED) takes the first
# value of every switch but its two.
SWITCHES: dict[str, dict[str, dict]] = {
    "algorithm": {
        "ppo": {},
        "grpo": {**_GROUP, "repeater_config.algorithm": "grpo"},
        "rloo": {**_GROUP, "repeater_config.algorithm": "rloo"},
        "reinforce_pp": {"model_configs.critic": None, "repeater_config.algorithm": "reinforce_pp"},
    },
    "norm_rewards": {
        str(v): {"repeater_config.norm_rewards": v} for v in ("batch", "running", False)
    },
    "pipe": {str(m): {"PIPE_MICRO_BATCH_NUM": m} for m in (4, 1)},
    "kl_mode": {m: {"repeater_config.kl_mode": m} for m in ("reward", "loss")},
    "kl_estimator": {k: {"repeater_config.kl_estimator": k} for k in ("k1", "k2", "k3", "abs")},
    "generator": {g: {_POLICY + "generator_config.generator_type": g} for g in ("vllm", "hf")},
    "lora": {
        "off": {},
        "on": {
            _POLICY + f"trainer_config.{k}": v
            for k, v in (("enable_lora", True), ("lora_dim", 8), ("lora_alpha", 16))
        },
    },
    "pack": {str(p): {"train_config.pack_sequences": p} for p in (False, True)},
    "updates": {
        "1x1": {},
        "2x2": {"train_config.ppo_epochs": 2, "train_config.num_mini_batches": 2},
    },
    "relay": {
        "off": {},
        "on": {
            "train_config.max_relay_episode": 1,
            "train_config.relay_sample_fn": "tests.test_switch_combinations:replay_one_prompt",
        },
    },
    "stream": {s: {"train_config.stream_data_loader_type": s} for s in ("fixed", "dynamic")},
    "zero2": {
        "off": {},
        "on": {_POLICY + "trainer_config.deepspeed_config": {"zero_optimization": {"stage": 2}}},
    },
    "grad_ckpt": {
        str(g): {_POLICY + "trainer_config.gradient_checkpointing": g} for g in (False, True)
    },
    "loss_agg": {a: {"train_config.loss_agg": a} for a in ("token_mean", "seq_mean_token_mean")},
    "ranking": {
        str(r): {_POLICY + "generator_config.batch_generation.ranking": r} for r in (False, True)
    },
    "stop": {"off": {}, "on": {"rollout_config.stop_token_list": "9;=>"}},
    "eval": {
        "off": {},
        "on": {
            "train_config.eval_interval": 2,
            "eval_dataset_config": {
                "message_datasets": [_EVAL],
                "samples_each_epoch": 4,
                "max_len": 48,
            },
        },
    },
    "save": {"end": {}, "every": {"train_config.save_interval": 1, "train_config.keep_last": 1}},
    "skip_actor_fwd": {
        str(s): {"train_config.skip_redundant_actor_forward": s} for s in (True, False)
    },
    "group_std": {g: {"repeater_config.group_std": g} for g in ("unbiased", "population")},
    "whiten": {
        str(w): {"repeater_config.advantage_whiten": w} for w in (False, "batch", "micro_batch")
    },
    "dual_clip": {str(c): {"train_config.dual_clip_c": c} for c in (None, 3.0)},
    "behaviour": {str(c): {"train_config.behaviour_correction": c} for c in (None, "tis")},
    "behaviour_logprobs": {str(b): {"rollout_config.behaviour_logprobs": b} for b in (None, True)},
    "request_seeds": {str(b): {"rollout_config.request_seeds": b} for b in (True, False)},
    "pause_gc": {str(b): {"rollout_config.pause_gc": b} for b in (True, False)},
    "staleness": {str(s): {"train_config.max_staleness": s} for s in (0, 1)},
    "logit_chunk": {str(c): {"train_config.logit_chunk_tokens": c} for c in (4096, 0)},
}

# Pairs that validation refuses, each with a piece of its one-line message. The covering array
# keeps them out of the other cases (so every other pair is trained, not hidden behind a
# refusal), and one case each, on the defaults otherwise, checks the refusal.
REFUSED: dict[tuple[tuple[str, str], tuple[str, str]], str] = {
    # peft adapters under a DeepSpeed engine: not built (config._validate_lora).
    (("lora", "on"), ("zero2", "on")): "enable_lora: LoRA under DeepSpeed is not built yet",
    # transformers' generate has no vLLM-style stop strings (issue 17: it failed mid-step).
    (("generator", "hf"), ("stop", "on")): "stop_token_list: needs the vllm generator",
    # the hf generator returns no behaviour log-probs (issue 14)
    (("generator", "hf"), ("behaviour", "tis")): "behaviour_correction: 'tis' needs the vllm",
    (("generator", "hf"), ("behaviour_logprobs", "True")): "behaviour_logprobs: needs the vllm",
    (("generator", "hf"), ("request_seeds", "False")): "request_seeds: False applies to the vllm",
    # Replayed samples are chosen when their step trains; 'fixed' would change what runs ahead.
    (("relay", "on"), ("staleness", "1")): "max_staleness: with a relay_sample_fn, run-ahead",
    # GAE advantages only; the others normalise their own.
    **{
        (("algorithm", algo), ("whiten", w)): "advantage_whiten: applies to algorithm 'ppo'"
        for algo in ("grpo", "rloo", "reinforce_pp")
        for w in ("batch", "micro_batch")
    },
    # 'batch' normalisation makes the stage wait for the batch, so 'micro_batch' would lie.
    (("norm_rewards", "batch"), ("whiten", "micro_batch")): "advantage_whiten: 'micro_batch'",
}


def replay_one_prompt(episode_relay_buffers) -> list[dict]:
    """relay_sample_fn of the 'relay' switch: every answer of the newest episode's first prompt
    (a whole group, which grpo/rloo need, and whole prompts, which 'fixed' steps need)."""
    buffer = episode_relay_buffers[-1].buffer
    first = min(d["prompt_index"] for d in buffer)
    return [d for d in buffer if d["prompt_index"] == first]


# ----------------------------------------------------------------------------- the covering array


def pairwise(domains: list[int], forbidden: set = frozenset()) -> list[tuple[int, ...]]:
    """Rows of value indices that hold every pair of values of every two columns, except the
    `forbidden` pairs (i, a, j, b) with i < j, which no row holds.

    Greedy and deterministic: each row starts from the first pair not yet covered, then fills
    the other columns in order, each with the allowed value that covers the most new pairs with
    the columns already filled (ties: the lowest index). Every row covers at least the pair it
    starts from, so the loop ends.
    """
    k = len(domains)

    def key(c, v, d, w):  # a pair, columns in order
        return (c, v, d, w) if c < d else (d, w, c, v)

    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(k), 2)
        for a in range(domains[i])
        for b in range(domains[j])
    } - set(forbidden)
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row: list[int | None] = [None] * k
        row[i], row[j] = a, b
        for c in range(k):
            if row[c] is not None:
                continue
            filled = [d for d in range(k) if row[d] is not None]
            allowed = [
                v
                for v in range(domains[c])
                if not any(key(c, v, d, row[d]) in forbidden for d in filled)
            ]
            if not allowed:
                raise ValueError(f"column {c}: every value is forbidden with row {row}")
            row[c] = max(
                allowed, key=lambda v: (sum(key(c, v, d, row[d]) in uncovered for d in filled), -v)
            )
        rows.append(tuple(row))
        uncovered -= {(p, row[p], q, row[q]) for p, q in itertools.combinations(range(k), 2)}
    return rows


def _uncovered_pairs(domains: list[int], rows: list[tuple[int, ...]]) -> set:
    """The slow twin of `pairwise`'s bookkeeping: every pair, checked against every row."""
    return {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(domains)), 2)
        for a in range(domains[i])
        for b in range(domains[j])
        if not any(r[i] == a and r[j] == b for r in rows)
    }


@pytest.mark.parametrize(
    "domains",
    [[2, 2], [2, 2, 2], [3, 3, 3, 3], [4, 3, 2, 2, 4, 2], [1, 5, 2]],
)
def test_pairwise_covers_every_pair_and_is_deterministic(domains):
    rows = pairwise(domains)
    assert not _uncovered_pairs(domains, rows)
    assert all(len(r) == len(domains) and all(0 <= v < n for v, n in zip(r, domains)) for r in rows)
    assert rows == pairwise(domains)
    a, b = sorted(domains)[-2:]
    assert a * b <= len(rows) <= math.prod(domains)  # the two largest must meet in full


def test_pairwise_leaves_out_forbidden_pairs_and_covers_the_rest():
    domains = [4, 3, 2, 2, 2]
    forbidden = {(0, 1, 2, 1), (3, 1, 4, 1), (0, 3, 1, 2)}
    rows = pairwise(domains, forbidden)
    assert _uncovered_pairs(domains, rows) == forbidden  # exactly those, and no other
    assert rows == pairwise(domains, forbidden)
    with pytest.raises(ValueError, match="every value is forbidden"):
        pairwise([2, 2, 2], {(0, 0, 2, 0), (0, 0, 2, 1)})


def test_the_switch_cases_cover_every_allowed_pair():
    runs = [c for c, refusal in cases() if refusal is None]
    names = list(SWITCHES)
    seen = {
        frozenset({(p, c[p]), (q, c[q])}) for c in runs for p, q in itertools.combinations(names, 2)
    }
    every = {
        frozenset({(p, a), (q, b)})
        for p, q in itertools.combinations(names, 2)
        for a in SWITCHES[p]
        for b in SWITCHES[q]
    }
    assert every - seen == {frozenset(pair) for pair in REFUSED}
    a, b = sorted(len(v) for v in SWITCHES.values())[-2:]
    assert len(runs) <= 3 * a * b  # near the a * b floor, far from the full product


def cases() -> list[tuple[dict[str, str], str | None]]:
    """(switch -> value label, the refusal expected or None) for every case."""
    names = list(SWITCHES)
    labels = [list(SWITCHES[n]) for n in names]
    at = {
        (n, label): (c, labels[c].index(label)) for c, n in enumerate(names) for label in labels[c]
    }
    forbidden = {(min(at[p], at[q]) + max(at[p], at[q])) for p, q in REFUSED}
    out = [
        ({n: labels[c][v] for c, (n, v) in enumerate(zip(names, row))}, None)
        for row in pairwise([len(x) for x in labels], forbidden)
    ]
    for (p, q), refusal in REFUSED.items():
        out.append(({n: labels[c][0] for c, n in enumerate(names)} | dict([p, q]), refusal))
    return out


# ----------------------------------------------------------------------------- the runs


def _overrides(case: dict[str, str], eval_path: Path) -> dict:
    over = {"train_config.stage_timeout_s": 120.0}
    for name, label in case.items():
        over.update(SWITCHES[name][label])
    if "eval_dataset_config" in over:
        ed = over["eval_dataset_config"]
        paths = [str(eval_path) if p is _EVAL else p for p in ed["message_datasets"]]
        over["eval_dataset_config"] = {**ed, "message_datasets": paths}
    return over


def _run_case(case, tmp_path, vllm_engine, initial_policy_weights, eval_path) -> str:
    """'run' or 'refused: <message>'; raises on anything after start-up."""
    from rlhf_pipe.trainer import RLHFTrainer

    try:
        cfg = tiny_config(tmp_path, **_overrides(case, eval_path))
    except ConfigError as e:
        assert "\n" not in str(e), f"a refusal is one line, got {str(e)!r}"
        return f"refused: {e}"
    engine = None
    if case["generator"] == "vllm":
        vllm_engine.load_weights(initial_policy_weights.items(), version=0)
        engine = vllm_engine
    trainer = RLHFTrainer(cfg, engine=engine, console=False)
    try:
        history = trainer.learn(2)
    finally:
        trainer.close()
    # The switches took effect, and the numbers are numbers.
    assert [h["policy_version"] for h in history] == [1, 2]
    assert all(math.isfinite(float(h["reward"])) for h in history)
    assert all(torch.isfinite(p).all() for p in trainer.actor.model.parameters())
    assert ("eval/reward" in history[1]) == (case["eval"] == "on")
    saved = sorted(p.name for p in (trainer.work_dir / "checkpoints").glob("step_*"))
    assert saved == ["step_000002"], saved  # keep_last=1 pruned step 1; 'end' saved only 2
    if case["relay"] == "on":
        assert history[1]["relay_samples"] > 0
    return "run"


@pytest.mark.slow
def test_every_pair_of_switches_runs_or_is_refused(
    tmp_path, vllm_engine, initial_policy_weights, tiny_assets
):
    start = time.monotonic()
    outcomes, failures = [], []
    for k, (case, refusal) in enumerate(cases()):
        t0 = time.monotonic()
        try:
            outcome = _run_case(
                case,
                tmp_path / f"c{k:02d}",
                vllm_engine,
                initial_policy_weights,
                tiny_assets.eval_prompts,
            )
        except Exception as e:  # noqa: BLE001 - every failure is collected, then reported
            outcome = f"FAILED after start-up: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        outcomes.append(outcome)
        print(f"case {k:02d} {time.monotonic() - t0:5.1f}s {outcome[:150]} | {case}")
        if refusal is None and outcome != "run":
            # A new refusal: if the pair truly cannot work, add it to REFUSED.
            failures.append((k, case, outcome))
        elif refusal is not None and not (outcome.startswith("refused") and refusal in outcome):
            failures.append((k, case, f"expected a refusal with {refusal!r}, got {outcome}"))
    runs = outcomes.count("run")
    print(
        f"switch combinations: {len(outcomes)} cases, {runs} runs, "
        f"{len(outcomes) - runs} refusals, {len(failures)} failures, "
        f"{time.monotonic() - start:.0f} s"
    )
    assert not failures, "\n".join(f"case {k}: {o}\n  {c}" for k, c, o in failures)
