"""plan_cli.py's command line: positive ints and the defaults."""

import argparse

import pytest

from rlhf_pipe.plan_cli import _positive_int, add_parser, cmd_plan
from tests.conftest import TINY_CONFIG


def test_positive_int():
    assert _positive_int("3") == 3
    for text in ("0", "-2", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="int >= 1"):
            _positive_int(text)


def test_plan_arguments_parse(capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", str(TINY_CONFIG), "--nnodes", "2"])
    assert args.nnodes == 2 and args.gpu_mem_gb == 80.0 and args.gpus_per_node is None
    assert args.fn is cmd_plan
    with pytest.raises(SystemExit):
        parser.parse_args(["plan", str(TINY_CONFIG), "--nnodes", "0"])
