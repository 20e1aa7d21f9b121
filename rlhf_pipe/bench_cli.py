"""`rlhf-pipe bench CONFIG --pipe 1,2,4 --steps N [--warmup W] [--out DIR] [--cfg-options K=V ...]`.

Runs the config once per PIPE_MICRO_BATCH_NUM in one process, with one vLLM engine, and writes
bench.json, report.md, timeline_pipe{M}.png, trace_pipe{M}.json and timeline.png into DIR
(default <work_dir>/bench). See rlhf_pipe/bench.py and BENCHMARKS.md.

`rlhf-pipe bench-predict BENCH_JSON [--pipe M1,..] [--sync-s S] [--trace TRACE] [--json OUT]`
prints the predicted step times on 1, 2, 4 and 8 GPUs from any bench.json
(rlhf_pipe/bench_predict.py).
"""

from __future__ import annotations

import argparse
import shlex

from rlhf_pipe.run_args import add_config_arguments, add_verbose_argument


def _pipes(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of ints >= 1, got {text!r}")
    return values


def _staleness(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected a comma list of ints >= 0, got {text!r}")
    return sorted(set(values) | {0})


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}")
        return value

    return parse


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `bench` on an argparse subparsers object."""
    p = sub.add_parser(
        "bench",
        help="time one config at several PIPE_MICRO_BATCH_NUM values: "
        "stage busy/idle, ideal bound, timelines",
    )
    add_config_arguments(p)
    p.add_argument(
        "--pipe",
        type=_pipes,
        default=[1, 2, 4],
        metavar="M1,M2,...",
        help="PIPE_MICRO_BATCH_NUM values (1 is added if missing; default 1,2,4)",
    )
    p.add_argument(
        "--staleness",
        type=_staleness,
        default=[0],
        metavar="S1,S2,...",
        help="train_config.max_staleness values; each s >= 1 reruns every M with run-ahead "
        "generation (0 is added if missing; default 0)",
    )
    p.add_argument("--steps", type=_count(1), default=3, help="measured steps per M (default 3)")
    p.add_argument(
        "--warmup",
        type=_count(0),
        default=1,
        help="steps run first and not measured, per M (default 1)",
    )
    p.add_argument("--out", help="output folder (default <work_dir>/bench)")
    p.add_argument(
        "--streaming-rounds",
        type=_count(1),
        default=3,
        help="A B B A rounds of the streaming-overhead measurement (default 3)",
    )
    add_verbose_argument(p)
    p.set_defaults(fn=cmd_bench)
    q = sub.add_parser(
        "bench-predict",
        help="predicted step times on 1, 2, 4 and 8 GPUs from a bench.json's busy seconds",
    )
    q.add_argument("bench_json", metavar="BENCH_JSON")
    q.add_argument(
        "--sync-s", type=float, help="weight sync seconds to assume instead of the measured"
    )
    q.add_argument(
        "--trace",
        metavar="TRACE_JSON",
        help="per-call times from this trace (the bench's trace_pipe1.json), for a bench.json "
        "without role_calls_busy_s",
    )
    q.add_argument(
        "--pipe",
        type=_pipes,
        metavar="M1,M2,...",
        help="PIPE_MICRO_BATCH_NUM values to predict (default: the bench's)",
    )
    q.add_argument("--json", metavar="FILE", help="also write the predictions to FILE")
    q.set_defaults(fn=cmd_predict)
    return p


def _command(args) -> str:
    parts = [
        "rlhf-pipe",
        "bench",
        args.config,
        "--pipe",
        ",".join(map(str, args.pipe)),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    if args.staleness != [0]:
        parts += ["--staleness", ",".join(map(str, args.staleness))]
    if args.streaming_rounds != 3:
        parts += ["--streaming-rounds", str(args.streaming_rounds)]
    if args.out:
        parts += ["--out", args.out]
    for flag, text in args.overrides:
        parts += [flag, text]
    return shlex.join(parts)


def cmd_bench(args, *, engine=None) -> int:
    """Run the bench and print where the outputs are. A bad config raises ConfigError."""
    from rlhf_pipe.bench import run_bench
    from rlhf_pipe.console import quiet_console
    from rlhf_pipe.run_args import load_run_config, overrides
    from rlhf_pipe.versions import warn_untested_vllm

    work_dir = load_run_config(args).train_config.work_dir  # checks the config first, too
    with quiet_console(work_dir, 0, args.verbose):
        warn_untested_vllm()
        result = run_bench(
            args.config,
            args.pipe,
            args.steps,
            args.warmup,
            args.out,
            overrides(args),
            engine=engine,
            command=_command(args),
            streaming_rounds=args.streaming_rounds,
            staleness=args.staleness,
        )
    for m, run in result["runs"].items():
        print(
            f"pipe {m}: pipeline {run['pipeline_s']:.3f} s, step {run['step_s']:.3f} s, "
            f"bound {run['bound_s']:.3f} s, efficiency {run['efficiency']:.2f}, "
            f"speedup {run['speedup']:.2f}"
        )
    for row in result.get("staleness", {}).values():
        print(
            f"staleness {row['max_staleness']} pipe {row['pipe']}: step {row['step_s']:.3f} s, "
            f"speedup {row['speedup']:.2f} against s=0, M=1"
        )
    ratio = result["streaming"]["ratio"]
    print(
        "streaming overhead: "
        + (
            f"generate_to_queue / generate tokens/s = {ratio:.3f}"
            if ratio is not None
            else result["streaming"]["note"]
        )
    )
    print(f"report: {result['out_dir']}/report.md")
    return 0


def cmd_predict(args) -> int:
    """Print the predictions of a bench.json as markdown (the report's section)."""
    import json

    from rlhf_pipe.bench import busy_by_role_call
    from rlhf_pipe.bench_predict import format_predictions, measured_steps, predictions
    from rlhf_pipe.run_args import UserError

    def read(path: str) -> dict:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: {e}") from None

    result = read(args.bench_json)
    if "1" not in result.get("runs", {}):
        raise UserError(f"{args.bench_json}: no serial run (runs['1']): not a bench.json")
    calls = None
    if args.trace:
        timeline = [
            (e["cat"], e["args"]["micro_batch"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6)
            for e in read(args.trace)["traceEvents"]
            if e.get("ph") == "X"
        ]
        calls = busy_by_role_call(timeline)
    pred = predictions(result, args.sync_s, calls, args.pipe)
    print(f"# Predictions from {args.bench_json} ({result.get('device', 'unknown device')})")
    print()
    print("\n".join(format_predictions(pred, measured_steps(result))))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(pred, f, indent=2)
    return 0
