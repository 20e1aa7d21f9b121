"""Predicted step time on 1, 2, 4 and 8 GPUs from one bench's measured busy seconds.

Pure functions: a bench.json dict in, a predictions dict out (no I/O, no torch). The bench puts
the result into bench.json "predictions" and report.md; `rlhf-pipe bench-predict bench.json`
recomputes it from any earlier bench.

Notation (seconds per step, from the serial run: s = 0, M = 1, where no stage overlaps another):

    G       the generate stage (the whole generation)
    F_r     role r's forward call. The forward calls of a micro-batch run concurrently; where
            they shared one device their sum exceeds the forward stage's busy seconds U, and
            each is scaled by U / sum (its share of the device time they shared)
    F_host  U minus the calls' sum, when that is positive (the stage's own host work)
    A       the advantage stage (host)
    T_r     role r's train call. The Train thread calls actor, then critic: they never overlap
    T_host  the train stage minus the train calls
    O       the optimizer stage (every model's step; bench.json does not split it per model)
    Y       the weight sync (vLLM loads the actor's new weights)

A layout places roles on devices d (R_d; "rollout" is a vLLM engine), with E engines sharing
the generation and D data-parallel replicas of every model role: g = G / E, f_r = F_r / D,
t_r = T_r / D.

    S_gen = g
    S_fwd = max_d sum_{r in R_d} f_r + F_host + A       forward calls of devices run in parallel
    S_tr  = sum_r t_r + T_host + O                       train calls run in turn, on any layout
    W_d   = g [d runs an engine] + sum_{r in R_d} (f_r + t_r) + O [d trains a model]

    bound(S, M) = max(S) + (sum(S) - max(S)) / M         (rlhf_pipe.bench.ideal_bound)

    s = 0:   step(M) = max(bound({S_gen, S_fwd, S_tr}, M), max_d W_d) + Y
    s >= 1:  step(M) = max(S_gen, bound({S_fwd, S_tr}, M), max_d W_d) + Y

At s = 0 a step is the stage pipeline, and no device can do less than its own work (the bench's
device bound). At s >= 1 step k+1's generation runs while step k trains, so generation leaves
the pipeline: the step is the longer of the two sides, or the busiest device where they share
one. The sync stays on both sides' path (the engine loads between two generations, the trainer
hands the weights over), so it is added, not overlapped.
"""

from __future__ import annotations

from typing import NamedTuple

MODEL_ROLES = ("actor", "critic", "reference", "reward")
TRAINED = ("actor", "critic")


class StepCosts(NamedTuple):
    """A step's measured work, in seconds (see the module's notation)."""

    generate: float  # G
    forward: dict[str, float]  # F_r per role
    forward_host: float  # F_host
    advantage: float  # A
    train: dict[str, float]  # T_r per role
    train_host: float  # T_host
    optimizer: float  # O
    sync: float  # Y
    split: bool  # False: bench.json had no per-call times; the stages count as the actor's


class Layout(NamedTuple):
    name: str
    devices: dict[str, tuple[str, ...]]  # device label -> roles placed there
    engines: int = 1  # E
    data_parallel: int = 1  # D


LAYOUTS = {
    1: Layout(
        "vLLM and every role on one GPU",
        {"gpu 0": ("rollout", *MODEL_ROLES)},
    ),
    2: Layout(
        "vLLM / actor + critic + reference + reward",
        {"gpu 0": ("rollout",), "gpu 1": MODEL_ROLES},
    ),
    4: Layout(
        "vLLM / actor / critic / reference + reward",
        {
            "gpu 0": ("rollout",),
            "gpu 1": ("actor",),
            "gpu 2": ("critic",),
            "gpu 3": ("reference", "reward"),
        },
    ),
    8: Layout(
        "the 4-GPU layout twice: 2 vLLM engines, every role on 2 data-parallel GPUs",
        {
            "gpus 0-1": ("rollout",),
            "gpus 2-3": ("actor",),
            "gpus 4-5": ("critic",),
            "gpus 6-7": ("reference", "reward"),
        },
        engines=2,
        data_parallel=2,
    ),
}

ASSUMPTIONS = (
    "Each role and the engine run on a GPU of their own at the speed measured here: no "
    "contention, and no transport cost between ranks beyond the measured weight sync Y.",
    "Forward calls that shared the measured device are scaled to their share of the forward "
    "stage; calls alone on a device are not.",
    "8 GPUs: linear data-parallel scaling (forward and train calls halve; gradient all-reduce "
    "free), and two vLLM engines halve generation; the optimizer step, host work and the sync "
    "are not halved.",
    "s >= 1 is the steady state of run-ahead (any s >= 1 gives the same step time): generation "
    "of step k+1 fully overlaps step k's Forward and Train.",
)


def step_costs(run: dict, sync_s: float | None = None, calls: dict | None = None) -> StepCosts:
    """The StepCosts of one bench.json run (the serial one: s = 0, M = 1). `calls` (role call
    row -> busy s) replaces the run's `role_calls_busy_s`; without either (a bench.json older
    than that field) the forward and train stages count as the actor's, so layouts that split
    the roles get an upper bound. `sync_s` replaces the measured Y."""
    stage = {name: row["busy_s"] for name, row in run["stages"].items()}
    if calls is None:
        calls = run.get("role_calls_busy_s") or {}
    forward = {r: calls[f"{r}.forward"] for r in MODEL_ROLES if f"{r}.forward" in calls}
    train = {r: calls[f"{r}.train"] for r in MODEL_ROLES if f"{r}.train" in calls}
    split = bool(calls)
    if not split:
        forward, train = {"actor": stage["forward"]}, {"actor": stage["train"]}
    summed = sum(forward.values())
    if summed > stage["forward"]:  # concurrent calls on one device: their shares of it
        forward = {r: s * stage["forward"] / summed for r, s in forward.items()}
    return StepCosts(
        generate=stage["generate"],
        forward=forward,
        forward_host=max(stage["forward"] - sum(forward.values()), 0.0),
        advantage=stage["advantage"],
        train=train,
        train_host=max(stage["train"] - sum(train.values()), 0.0),
        optimizer=stage["optimizer"],
        sync=run["sync_s"] if sync_s is None else sync_s,
        split=split,
    )


def _bound(stages: list[float], m: int) -> float:
    """rlhf_pipe.bench.ideal_bound, without importing the bench (and torch)."""
    longest = max(stages)
    return longest + (sum(stages) - longest) / m


def predict(costs: StepCosts, layout: Layout, pipes: list[int]) -> dict:
    """Stage seconds, busy seconds per device and the predicted step per M (keys: str(M), as
    in bench.json) at s = 0 and at s >= 1, each with the term that bounds it."""
    g = costs.generate / layout.engines
    f = {r: s / layout.data_parallel for r, s in costs.forward.items()}
    t = {r: s / layout.data_parallel for r, s in costs.train.items()}
    on = layout.devices
    s_fwd = (
        max(sum(f.get(r, 0.0) for r in roles) for roles in on.values())
        + costs.forward_host
        + costs.advantage
    )
    s_tr = sum(t.values()) + costs.train_host + costs.optimizer
    busy = {
        d: g * ("rollout" in roles)
        + sum(f.get(r, 0.0) + t.get(r, 0.0) for r in roles)
        + costs.optimizer * any(r in t for r in roles if r in TRAINED)
        for d, roles in on.items()
    }
    busiest = max(busy, key=lambda d: busy[d])
    device = f"{busiest} ({' + '.join(on[busiest])})"
    s0, s1 = {}, {}
    for m in pipes:
        pipeline = _bound([g, s_fwd, s_tr], m)
        if busy[busiest] > pipeline:
            s0[str(m)] = {"step_s": busy[busiest] + costs.sync, "bounded_by": device}
        else:
            what = "serial (sum of stages)" if m == 1 else "stage pipeline"
            s0[str(m)] = {"step_s": pipeline + costs.sync, "bounded_by": what}
        ahead = _bound([s_fwd, s_tr], m)
        terms = {"generation": g, "forward + train": ahead, device: busy[busiest]}
        top = max(terms, key=lambda k: terms[k])  # a tie: the first named
        s1[str(m)] = {"step_s": terms[top] + costs.sync, "bounded_by": top}
    return {
        "layout": layout.name,
        "devices": {d: list(roles) for d, roles in on.items()},
        "engines": layout.engines,
        "data_parallel": layout.data_parallel,
        "stages_s": {"generate": g, "forward": s_fwd, "train": s_tr},
        "devices_busy_s": busy,
        "s0": s0,
        "s1": s1,
    }


def predictions(
    result: dict,
    sync_s: float | None = None,
    calls: dict | None = None,
    pipes: list[int] | None = None,
) -> dict:
    """bench.json "predictions": every layout of LAYOUTS at the bench's M values (or `pipes`),
    from its serial run, with the speedup against that run's measured step. `sync_s`, `calls`:
    see step_costs."""
    pipes = [int(m) for m in (pipes or result["pipes"])]
    serial = result["runs"]["1"]
    costs = step_costs(serial, sync_s, calls)
    layouts = {str(n): predict(costs, layout, pipes) for n, layout in LAYOUTS.items()}
    base = serial["step_s"]
    for p in layouts.values():
        for side in ("s0", "s1"):
            for row in p[side].values():
                row["speedup"] = base / row["step_s"] if row["step_s"] > 0 else None
    notes = []
    if calls is not None:
        notes.append(
            "per-call times from a trace (one step), the stage times from bench.json (the mean)"
        )
    if not costs.split:
        notes.append(
            "no per-call times in this bench.json (role_calls_busy_s): the forward and train "
            "stages are counted as the actor's, so the 4- and 8-GPU rows are upper bounds"
        )
    if sync_s is not None:
        notes.append(f"weight sync set to {sync_s} s (measured: {serial['sync_s']:.4f} s)")
    return {
        "formula": [
            "s = 0:  step(M) = max(bound({S_gen, S_fwd, S_tr}, M), max_d W_d) + Y",
            "s >= 1: step(M) = max(S_gen, bound({S_fwd, S_tr}, M), max_d W_d) + Y",
            "bound(S, M) = max(S) + (sum(S) - max(S)) / M",
            "S_gen = G / E;  S_fwd = max_d sum_{r on d} F_r / D + F_host + A;  "
            "S_tr = sum_r T_r / D + T_host + O",
            "W_d = G / E [engine on d] + sum_{r on d} (F_r + T_r) / D + O [d trains]",
        ],
        "assumptions": list(ASSUMPTIONS),
        "notes": notes,
        "measured_step_s": base,
        "costs": costs._asdict(),
        "layouts": layouts,
    }


def measured_steps(result: dict) -> dict:
    """{"s0"|"s1": {str(M): mean step s}} a bench measured on its own layout: its runs, and
    its smallest s >= 1 of the staleness table (empty without one)."""
    ahead = [row for row in (result.get("staleness") or {}).values() if row["max_staleness"]]
    first = min((row["max_staleness"] for row in ahead), default=None)
    return {
        "s0": {str(m): run["step_s"] for m, run in result["runs"].items()},
        "s1": {str(x["pipe"]): x["step_s"] for x in ahead if x["max_staleness"] == first},
    }


def _f(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_predictions(pred: dict, measured: dict | None = None) -> list[str]:
    """report.md lines. `measured`: {"s0"|"s1": {str(M): step s}} of the bench itself."""
    pipes = list(next(iter(pred["layouts"].values()))["s0"])
    c = pred["costs"]
    cols = [f"s=0, M={m}" for m in pipes] + [f"s>=1, M={m}" for m in pipes]
    lines = [
        "Predictions, not measurements: the serial run's busy seconds placed on other layouts.",
        "",
        "```",
        *pred["formula"],
        "```",
        "",
        f"From the serial run: G {_f(c['generate'])} s, "
        + ", ".join(f"F_{r} {_f(s)} s" for r, s in c["forward"].items())
        + f", F_host {_f(c['forward_host'])} s, A {_f(c['advantage'])} s, "
        + ", ".join(f"T_{r} {_f(s)} s" for r, s in c["train"].items())
        + f", T_host {_f(c['train_host'])} s, O {_f(c['optimizer'])} s, Y {_f(c['sync'], 4)} s.",
        "",
        *[f"- {a}" for a in pred["assumptions"]],
        *[f"- Note: {n}" for n in pred["notes"]],
        "",
        "Step seconds (speedup against the measured s=0, M=1 step of "
        f"{_f(pred['measured_step_s'])} s):",
        "",
        "| GPUs | layout | "
        + " | ".join(cols)
        + f" | bounded by at M={pipes[-1]}: s=0; s>=1 | busy s per GPU |",
        "|---|---|" + "---|" * len(cols) + "---|---|",
    ]
    for n, p in pred["layouts"].items():
        cells = [
            f"{_f(p[side][m]['step_s'])} ({_f(p[side][m]['speedup'], 2)}x)"
            for side in ("s0", "s1")
            for m in pipes
        ]
        bounded = f"{p['s0'][pipes[-1]]['bounded_by']}; {p['s1'][pipes[-1]]['bounded_by']}"
        busy = ", ".join(f"{d} {_f(s)}" for d, s in p["devices_busy_s"].items())
        lines.append(f"| {n} | {p['layout']} | {' | '.join(cells)} | {bounded} | {busy} |")
    if measured:
        cells = [_f(measured.get(side, {}).get(m)) for side in ("s0", "s1") for m in pipes]
        lines.append(f"| measured | this bench's own layout | {' | '.join(cells)} | | |")
    return lines
