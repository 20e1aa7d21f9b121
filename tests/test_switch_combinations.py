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

# name -> {value label: the overrides that set it}. The first value of each is the default.
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
}


def replay_one_prompt(episode_relay_buffers) -> list[dict]:
    """relay_sample_fn of the 'relay' switch: every answer of the newest episode's first prompt
    (a whole group, which grpo/rloo need, and whole prompts, which 'fixed' steps need)."""
    buffer = episode_relay_buffers[-1].buffer
    first = min(d["prompt_index"] for d in buffer)
    return [d for d in buffer if d["prompt_index"] == first]


# ----------------------------------------------------------------------------- the covering array


def pairwise(domains: list[int]) -> list[tuple[int, ...]]:
    """Rows of value indices that hold every pair of values of every two columns.

    Greedy and deterministic: each row starts from the first pair not yet covered, then fills
    the other columns in order, each with the value that covers the most new pairs with the
    columns already filled (ties: the lowest index). Every row covers at least the pair it
    starts from, so the loop ends.
    """
    k = len(domains)
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(k), 2)
        for a in range(domains[i])
        for b in range(domains[j])
    }
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row: list[int | None] = [None] * k
        row[i], row[j] = a, b
        for c in range(k):
            if row[c] is not None:
                continue

            def gain(v, c=c):
                return sum(
                    ((d, row[d], c, v) if d < c else (c, v, d, row[d])) in uncovered
                    for d in range(k)
                    if row[d] is not None
                )

            row[c] = max(range(domains[c]), key=lambda v: (gain(v), -v))
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
    [
        [2, 2],
        [2, 2, 2],
        [3, 3, 3, 3],
        [4, 3, 2, 2, 4, 2],
        [1, 5, 2],
        [len(v) for v in SWITCHES.values()],
    ],
)
def test_pairwise_covers_every_pair_and_is_deterministic(domains):
    rows = pairwise(domains)
    assert not _uncovered_pairs(domains, rows)
    assert all(len(r) == len(domains) and all(0 <= v < n for v, n in zip(r, domains)) for r in rows)
    assert rows == pairwise(domains)
    a, b = sorted(domains)[-2:]
    assert a * b <= len(rows) <= math.prod(domains)  # the two largest must meet in full


def test_pairwise_is_much_smaller_than_the_product():
    domains = [len(v) for v in SWITCHES.values()]
    assert len(pairwise(domains)) <= 24 < math.prod(domains)


def cases() -> list[dict[str, str]]:
    names = list(SWITCHES)
    labels = [list(SWITCHES[n]) for n in names]
    return [
        {n: labels[c][v] for c, (n, v) in enumerate(zip(names, row))}
        for row in pairwise([len(x) for x in labels])
    ]


# ----------------------------------------------------------------------------- the runs


def _overrides(case: dict[str, str], eval_path: Path) -> dict:
    over = {"train_config.stage_timeout_s": 120.0}
    for name, label in case.items():
        over.update(SWITCHES[name][label])
    if "eval_dataset_config" in over:
        ed = dict(over["eval_dataset_config"])
        ed["message_datasets"] = [str(eval_path)]
        over["eval_dataset_config"] = ed
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
    for k, case in enumerate(cases()):
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
            failures.append((k, case, outcome))
        outcomes.append(outcome)
        print(f"case {k:02d} {time.monotonic() - t0:5.1f}s {outcome[:160]} | {case}")
    runs = sum(o == "run" for o in outcomes)
    refused = [o for o in outcomes if o.startswith("refused")]
    print(
        f"switch combinations: {len(outcomes)} cases, {runs} runs, {len(refused)} refusals, "
        f"{len(failures)} failures, {time.monotonic() - start:.0f} s"
    )
    assert not failures, "\n".join(f"case {k}: {o}\n  {c}" for k, c, o in failures)
    assert runs >= len(outcomes) // 2  # refusals are the exception, not the rule
