"""`rlhf-pipe plan CONFIG [--nnodes N --gpus-per-node G]`: rank/GPU map, memory, checks.

It needs no GPU, and the config's model folders need not exist here: the config is loaded
with check_paths=False, which skips only the checks against this machine (model folders,
token_env variables). The
plan goes to stdout. Each failed check prints one line on stderr,
"error: <config>: placement: <message>", and the exit code is then 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from rlhf_pipe.run_args import add_config_arguments
from rlhf_pipe.run_args import overrides as run_overrides

USAGE_ERROR = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `plan` on an argparse subparsers object."""
    p = sub.add_parser(
        "plan", help="rank/GPU map, memory per GPU and placement checks (no GPU needed)"
    )
    add_config_arguments(p)
    p.add_argument("--nnodes", type=_positive_int, help="nodes of the run: checks the world size")
    p.add_argument(
        "--gpus-per-node", type=_positive_int, help="default: placement_config.gpus_per_node"
    )
    p.add_argument(
        "--gpu-mem-gb",
        type=float,
        default=80.0,
        help="memory of one GPU in GB (10^9 bytes); larger estimates warn (default 80)",
    )
    p.set_defaults(fn=cmd_plan)
    return p


def load_for_plan(path, overrides: dict | None = None):
    """load_config without the model-folder existence checks (every other check still runs)."""
    from rlhf_pipe.validation import load_config

    return load_config(path, overrides, check_paths=False)


def cmd_plan(args) -> int:
    """Print the plan; 0 if every check passes, else 2. A bad config raises ConfigError."""
    from rlhf_pipe.placement import check, errors, estimate_memory, format_plan, make_placement

    cfg = load_for_plan(args.config, run_overrides(args))
    world = os.environ.get("WORLD_SIZE")
    if world is not None and not world.strip().isdigit():
        print(f"error: WORLD_SIZE: expected an int, got {world!r}", file=sys.stderr)
        return USAGE_ERROR
    placement = make_placement(
        cfg, getattr(args, "nnodes", None), getattr(args, "gpus_per_node", None)
    )
    checks = check(placement, world_size=None if world is None else int(world))
    memory = estimate_memory(placement, gpu_mem_gb=getattr(args, "gpu_mem_gb", 80.0))
    print(format_plan(placement, memory, checks))
    failed = errors(placement, checks)
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    return USAGE_ERROR if failed else 0
