"""bench_predict.py: the predicted step on 1, 2, 4 and 8 GPUs, by hand.

The hand example, seconds per step of a serial run on one GPU:
    G 6; forward calls actor 1, critic 1, reference 2, all concurrent in a forward stage of
    U = 2 (so each is scaled by 2 / 4: 0.5, 0.5, 1); A 0.5; train calls actor 3, critic 1 in
    a train stage of 4.5 (T_host 0.5); O 0.5; Y 0.25.
"""

import json

import pytest

from rlhf_pipe.bench_predict import (
    LAYOUTS,
    StepCosts,
    format_predictions,
    measured_steps,
    predict,
    predictions,
    step_costs,
)
from tests.conftest import ROOT

STAGES = {"generate": 6.0, "forward": 2.0, "advantage": 0.5, "train": 4.5, "optimizer": 0.5}
CALLS = {
    "actor.forward": 1.0,
    "critic.forward": 1.0,
    "reference.forward": 2.0,
    "actor.train": 3.0,
    "critic.train": 1.0,
}
COSTS = StepCosts(
    generate=6.0,
    forward={"actor": 0.5, "critic": 0.5, "reference": 1.0},
    forward_host=0.0,
    advantage=0.5,
    train={"actor": 3.0, "critic": 1.0},
    train_host=0.5,
    optimizer=0.5,
    sync=0.25,
    split=True,
)
GRPO_BENCH = ROOT / "benchmarks/results/2026-12-01_h200_grpo_staleness"
GRPO_BENCH = GRPO_BENCH / "bench_1gpu_grpo05_staleness01" / "bench.json"


def _run(calls=CALLS, step_s=14.0):
    run = {"stages": {k: {"busy_s": v} for k, v in STAGES.items()}, "sync_s": 0.25}
    return {**run, "role_calls_busy_s": calls, "step_s": step_s}


def test_step_costs_scale_concurrent_forward_calls_to_the_stage():
    assert step_costs(_run()) == COSTS  # 1 + 1 + 2 = 4 > U = 2: each times 2 / 4


def test_step_costs_keep_forward_calls_that_did_not_overlap():
    calls = {"actor.forward": 0.5, "critic.forward": 1.0, "actor.train": 4.5}
    c = step_costs(_run(calls))
    assert c.forward == {"actor": 0.5, "critic": 1.0}
    assert c.forward_host == 0.5  # U 2 - (0.5 + 1)
    assert c.train == {"actor": 4.5} and c.train_host == 0.0


def test_step_costs_without_call_times_count_the_stages_as_the_actors():
    c = step_costs({k: v for k, v in _run(None).items()}, sync_s=2.5)
    assert c.forward == {"actor": 2.0} and c.train == {"actor": 4.5}
    assert c.forward_host == 0.0 and c.train_host == 0.0 and not c.split
    assert c.sync == 2.5  # the override, not the measured 0.25


def _steps(layout):
    p = predict(COSTS, LAYOUTS[layout], [1, 4])
    return p, {
        (side, m): (p[side][m]["step_s"], p[side][m]["bounded_by"])
        for side in ("s0", "s1")
        for m in ("1", "4")
    }


def test_two_gpus_by_hand():
    p, got = _steps(2)
    # S_gen 6; S_fwd = (0.5 + 0.5 + 1) + 0 + 0.5 = 2.5; S_tr = (3 + 1) + 0.5 + 0.5 = 5
    assert p["stages_s"] == {"generate": 6.0, "forward": 2.5, "train": 5.0}
    # gpu 1: forward 2 + train 4 + optimizer 0.5
    assert p["devices_busy_s"] == {"gpu 0": 6.0, "gpu 1": 6.5}
    gpu1 = "gpu 1 (actor + critic + reference + reward)"
    assert got == {
        ("s0", "1"): (13.5 + 0.25, "serial (sum of stages)"),  # 6 + 2.5 + 5
        ("s0", "4"): (6 + 7.5 / 4 + 0.25, "stage pipeline"),  # 7.875 > gpu 1's 6.5
        ("s1", "1"): (7.5 + 0.25, "forward + train"),  # max(6, 5 + 2.5, 6.5)
        ("s1", "4"): (6.5 + 0.25, gpu1),  # max(6, 5 + 2.5 / 4, 6.5)
    }


def test_four_gpus_by_hand():
    p, got = _steps(4)
    # The forward calls of different GPUs run in parallel: max(0.5, 0.5, 1) + 0.5
    assert p["stages_s"] == {"generate": 6.0, "forward": 1.5, "train": 5.0}
    assert p["devices_busy_s"] == {"gpu 0": 6.0, "gpu 1": 4.0, "gpu 2": 2.0, "gpu 3": 1.0}
    assert got == {
        ("s0", "1"): (12.5 + 0.25, "serial (sum of stages)"),
        ("s0", "4"): (6 + 6.5 / 4 + 0.25, "stage pipeline"),
        ("s1", "1"): (6.5 + 0.25, "forward + train"),  # max(6, 5 + 1.5, 6)
        ("s1", "4"): (6.0 + 0.25, "generation"),  # max(6, 5 + 1.5 / 4, gpu 0's 6): a tie
    }


def test_eight_gpus_by_hand():
    p, got = _steps(8)
    # E = D = 2: G 3; forward 0.25, 0.25, 0.5; train 1.5, 0.5; host work and O unchanged
    assert p["stages_s"] == {"generate": 3.0, "forward": 1.0, "train": 3.0}
    assert p["devices_busy_s"] == {
        "gpus 0-1": 3.0,
        "gpus 2-3": 0.25 + 1.5 + 0.5,
        "gpus 4-5": 0.25 + 0.5 + 0.5,
        "gpus 6-7": 0.5,
    }
    assert got == {
        ("s0", "1"): (7.0 + 0.25, "serial (sum of stages)"),
        ("s0", "4"): (3 + 4 / 4 + 0.25, "stage pipeline"),
        ("s1", "1"): (4.0 + 0.25, "forward + train"),
        ("s1", "4"): (3 + 1 / 4 + 0.25, "forward + train"),
    }


def test_one_gpu_is_its_own_floor():
    p, got = _steps(1)
    assert p["devices_busy_s"] == {"gpu 0": 6 + 2 + 4 + 0.5}
    gpu0 = "gpu 0 (rollout + actor + critic + reference + reward)"
    assert got[("s0", "4")] == (12.5 + 0.25, gpu0)  # the stage bound 7.875 is below it
    assert got[("s1", "4")] == (12.5 + 0.25, gpu0)  # run-ahead cannot help on one device


def test_predictions_of_a_bench_json():
    result = {"pipes": [1, 4], "runs": {"1": _run(), "4": {"step_s": 13.0}}}
    pred = predictions(result)
    assert list(pred["layouts"]) == ["1", "2", "4", "8"]
    assert pred["notes"] == [] and pred["measured_step_s"] == 14.0
    row = pred["layouts"]["2"]["s1"]["4"]
    assert row["step_s"] == 6.75 and row["speedup"] == pytest.approx(14.0 / 6.75)
    json.dumps(pred)  # bench.json takes it as it is
    old = predictions({"pipes": [1], "runs": {"1": _run(None)}}, sync_s=1.0)
    assert "role_calls_busy_s" in old["notes"][0] and "1.0 s" in old["notes"][1]
    lines = format_predictions(pred, measured_steps(result))
    text = "\n".join(lines)
    assert "Predictions, not measurements" in text and pred["formula"][0] in text
    assert "| 2 | vLLM / actor + critic + reference + reward | 13.750 (1.02x) |" in text
    assert "| measured | this bench's own layout | 14.000 | 13.000 | n/a | n/a | | |" in text


def test_measured_steps_take_the_smallest_staleness():
    result = {
        "runs": {"1": {"step_s": 4.0}},
        "staleness": {
            "s0_pipe1": {"max_staleness": 0, "pipe": 1, "step_s": 4.0},
            "s2_pipe1": {"max_staleness": 2, "pipe": 1, "step_s": 3.0},
            "s1_pipe1": {"max_staleness": 1, "pipe": 1, "step_s": 3.5},
        },
    }
    assert measured_steps(result) == {"s0": {"1": 4.0}, "s1": {"1": 3.5}}


def test_the_grpo_staleness_bench_of_2026_12_01():
    """The committed one-GPU result: what BENCHMARKS.md quotes."""
    result = json.loads(GRPO_BENCH.read_text())
    pred = predictions(result)
    two, eight = pred["layouts"]["2"], pred["layouts"]["8"]
    c = pred["costs"]
    # s=0 on 2 GPUs: the serial sum; s>=1: generation alone, G + Y
    assert two["s0"]["1"]["step_s"] == pytest.approx(
        c["generate"]
        + c["forward_host"]
        + sum(c["forward"].values())
        + c["advantage"]
        + sum(c["train"].values())
        + c["train_host"]
        + c["optimizer"]
        + c["sync"]
    )
    assert two["s1"]["1"] == {
        "step_s": pytest.approx(c["generate"] + c["sync"]),
        "bounded_by": "generation",
        "speedup": pytest.approx(result["runs"]["1"]["step_s"] / (c["generate"] + c["sync"])),
    }
    assert eight["s1"]["1"]["step_s"] == pytest.approx(c["generate"] / 2 + c["sync"])
