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


GRPO_RUN = "benchmarks/results/2026-12-01_h200_grpo_staleness/bench_1gpu_grpo05_staleness01"
PPO_RUN = (
    "benchmarks/results/2026-11-22_h200x2_streaming_10_rounds_direct_cost/bench_1gpu_streaming10"
)


def test_bench_predict_prints_the_tables_and_writes_json(tmp_path, capsys):
    import json

    from rlhf_pipe.cli import main
    from tests.conftest import ROOT

    out = tmp_path / "pred.json"
    assert main(["bench-predict", str(ROOT / GRPO_RUN / "bench.json"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Predictions, not measurements" in text and "| 8 |" in text
    assert "| measured | this bench's own layout | 3.664 | 4.138 | | |" in text
    assert set(json.loads(out.read_text())["layouts"]) == {"1", "2", "4", "8"}


def test_bench_predict_takes_call_times_from_a_trace(capsys):
    """A bench.json from before role_calls_busy_s: the trace of its serial step splits the
    forward and train stages per role, so the 4-GPU layout differs from the 2-GPU one."""
    from rlhf_pipe.cli import main
    from tests.conftest import ROOT

    folder = ROOT / PPO_RUN
    assert main(["bench-predict", str(folder / "bench.json")]) == 0
    lumped = capsys.readouterr().out
    assert "are upper bounds" in lumped
    assert (
        main(
            [
                "bench-predict",
                str(folder / "bench.json"),
                "--trace",
                str(folder / "trace_pipe1.json"),
            ]
        )
        == 0
    )
    split = capsys.readouterr().out
    assert "from a trace" in split and "F_critic" in split and "T_critic" in split


def test_bench_predict_refuses_a_file_that_is_no_bench(tmp_path, capsys):
    from rlhf_pipe.cli import main

    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert main(["bench-predict", str(bad)]) == 2
    assert "not a bench.json" in capsys.readouterr().err


def test_train_module_bench_takes_staleness():
    from rlhf_pipe import train
    from tests.conftest import TINY_CONFIG

    args = train._parse([str(TINY_CONFIG), "--bench", "1,4", "--staleness", "2,1"])
    assert args.staleness == [0, 1, 2]
    assert train._parse([str(TINY_CONFIG), "--bench", "1"]).staleness == [0]


def test_staleness_without_bench_is_refused(capsys):
    from rlhf_pipe import train
    from tests.conftest import TINY_CONFIG

    assert train.main([str(TINY_CONFIG), "--staleness", "0,1"]) == 2
    assert "--staleness: a bench option" in capsys.readouterr().err
