"""`rlhf-pipe` command line: train, plan, bench, apply-vllm-patch.

Errors a user can fix (a bad config, a bad data file, a missing model folder) print one line
and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

USAGE_ERROR = 2


def _user_errors():
    from rlhf_pipe.checkpoint import CheckpointError
    from rlhf_pipe.config import ConfigError
    from rlhf_pipe.data import DataError
    from rlhf_pipe.models import ModelLoadError

    return (ConfigError, DataError, ModelLoadError, CheckpointError)


def _load(args):
    from rlhf_pipe.config import load_config, parse_override

    overrides = dict(parse_override(s) for s in args.set or [])
    if getattr(args, "pipe", None) is not None:
        overrides["PIPE_MICRO_BATCH_NUM"] = args.pipe
    if getattr(args, "work_dir", None):
        overrides["train_config.work_dir"] = args.work_dir
    if getattr(args, "max_steps", None) is not None:
        overrides["train_config.max_train_step"] = args.max_steps
    return load_config(args.config, overrides)


def cmd_train(args) -> int:
    if args.nproc:
        return _launch_torchrun(args)
    cfg = _load(args)
    from rlhf_pipe.trainer import RLHFTrainer

    trainer = RLHFTrainer(cfg)
    if args.resume:
        checkpoint = trainer.resume(args.resume)
        if checkpoint is not None:
            print(f"resumed from {checkpoint} (step {trainer.step_index})")
        else:
            print(f"--resume auto: no checkpoint in {cfg.train_config.work_dir}; starting fresh")
    history = trainer.learn()
    trainer.close()
    rewards = [h["reward"] for h in history]
    if not rewards:
        print("nothing to train: max_train_step already reached")
        return 0
    k = min(5, len(rewards) // 2) or 1
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    print(
        f"mean reward: first {k} steps {first:.4f}, last {k} steps {last:.4f} "
        f"({'+' if last >= first else ''}{last - first:.4f})"
    )
    print(f"metrics: {trainer.logger.jsonl_path}")
    return 0


def cmd_export(args) -> int:
    from rlhf_pipe.checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.part)
    print(f"exported {args.part} of {args.checkpoint} to {out}")
    return 0


def _launch_torchrun(args) -> int:
    """One node: `torchrun --nproc-per-node N -m rlhf_pipe.train CONFIG ...`, N from the
    placement when --nproc auto."""
    import subprocess

    nproc = args.nproc
    if nproc == "auto":
        from rlhf_pipe.placement import make_placement

        nproc = str(make_placement(_load(args)).world_size)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        nproc,
        "-m",
        "rlhf_pipe.train",
        args.config,
    ]
    for item in args.set or []:
        cmd += ["--set", item]
    for flag, value in (
        ("train_config.work_dir", args.work_dir),
        ("train_config.max_train_step", args.max_steps),
        ("PIPE_MICRO_BATCH_NUM", args.pipe),
    ):
        if value is not None:
            cmd += ["--set", f"{flag}={value}"]
    if args.resume:
        cmd += ["--resume", args.resume]
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
    p.add_argument("config")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. train_config.max_train_step=3",
    )
    p.add_argument("--pipe", type=int, help="PIPE_MICRO_BATCH_NUM")
    p.add_argument("--work-dir")
    p.add_argument("--max-steps", type=int)
    p.add_argument(
        "--nproc",
        metavar="N|auto",
        help="launch torchrun with N processes on this node (auto: as the placement "
        "needs), roles on their own ranks; default: every role in this process",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from the newest checkpoint in the work dir, or from PATH",
    )
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser(
        "export", help="copy a checkpoint's actor (or critic) out as a plain HF folder"
    )
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--part", choices=("actor", "critic"), default="actor")
    p.set_defaults(fn=cmd_export)
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
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
