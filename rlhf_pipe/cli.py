"""`rlhf-pipe` command line: train, export, report, plan, bench, bench-predict, apply-vllm-patch.

Errors a user can fix (a bad config, a bad data file, a missing model folder) print one line
and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from rlhf_pipe.run_args import add_run_arguments, user_errors

USAGE_ERROR = 2


def cmd_train(args) -> int:
    if args.nproc:
        return _launch_torchrun(args)
    from rlhf_pipe.train import run

    return run(args)


def cmd_report(args) -> int:
    from rlhf_pipe.report import write_report

    out, lines = write_report(args.work_dir, args.out)
    for line in lines:
        print(line)
    print(f"report: {out}")
    return 0


def cmd_export(args) -> int:
    from rlhf_pipe.checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.part)
    print(f"exported {args.part} of {args.checkpoint} to {out}")
    return 0


def _launch_torchrun(args) -> int:
    """One node: `torchrun --nproc-per-node N -m rlhf_pipe.train CONFIG ...`, N from the
    placement when --nproc auto. rlhf_pipe.train then runs the same `run` as one process."""
    import subprocess

    from rlhf_pipe.run_args import forward_argv, load_run_config

    nproc = args.nproc
    if nproc == "auto":
        from rlhf_pipe.placement import make_placement

        nproc = str(make_placement(load_run_config(args)).world_size)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", nproc]
    cmd += ["-m", "rlhf_pipe.train", *forward_argv(args)]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "apply-vllm-patch":
        from rlhf_pipe.vllm_patch.tool import main as patch_main

        return patch_main(argv[1:])
    parser = argparse.ArgumentParser(prog="rlhf-pipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a config (one process; torchrun for many)")
    add_run_arguments(p)
    p.add_argument(
        "--nproc",
        metavar="N|auto",
        help="launch torchrun with N processes on this node (auto: as the placement "
        "needs), roles on their own ranks; default: every role in this process",
    )
    p.set_defaults(fn=cmd_train, bench=None)  # bench: only `-m rlhf_pipe.train` has --bench
    p = sub.add_parser(
        "export", help="copy a checkpoint's actor (or critic) out as a plain HF folder"
    )
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--part", choices=("actor", "critic"), default="actor")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("report", help="plot a run's metrics.jsonl into a PNG, print a summary")
    p.add_argument("work_dir", metavar="WORK_DIR")
    p.add_argument("--out", metavar="FILE.png", help="default: WORK_DIR/report.png")
    p.set_defaults(fn=cmd_report)
    from rlhf_pipe.bench_cli import add_parser as add_bench_parser
    from rlhf_pipe.plan_cli import add_parser as add_plan_parser

    add_plan_parser(sub)
    add_bench_parser(sub)
    sub.add_parser(
        "apply-vllm-patch",
        help="add generate_to_queue to the installed vLLM (see rlhf-pipe apply-vllm-patch --help)",
    )
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
