"""bench_cli.py's argument types: PIPE_MICRO_BATCH_NUM lists and counts."""

import argparse

import pytest

from rlhf_pipe.bench_cli import _count, _pipes, add_parser


def test_pipes_reads_a_comma_list():
    assert _pipes("1,2, 4,") == [1, 2, 4]


@pytest.mark.parametrize("text", ["", "0,2", "a", "-1"])
def test_bad_pipes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="comma list of ints >= 1"):
        _pipes(text)


def test_count_has_a_minimum():
    parse = _count(0)
    assert parse("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="int >= 0"):
        parse("-1")
    with pytest.raises(argparse.ArgumentTypeError):
        _count(1)("x")


def test_bench_is_registered_with_its_function():
    parser = argparse.ArgumentParser()
    p = add_parser(parser.add_subparsers())
    assert p.get_default("fn") is not None
