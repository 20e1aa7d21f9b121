"""The shared run arguments: --cfg-options in mmengine's syntax, --set beside it, which wins,
and the torchrun forwarding that must parse back to the same overrides."""

import argparse

import pytest
from mmengine.config import DictAction

from rlhf_pipe.cli import main
from rlhf_pipe.config import ConfigError
from rlhf_pipe.run_args import (
    add_config_arguments,
    add_run_arguments,
    forward_argv,
    overrides,
    parse_cfg_value,
)
from tests.conftest import ROOT, TINY_CONFIG

QWEN = ROOT / "examples/rlhf/qwen2_0_5b_colocate_1gpu.py"


def _args(*argv):
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    return p.parse_args([str(TINY_CONFIG), *argv])


@pytest.mark.parametrize(
    "text,value",
    [
        ("3", 3),
        ("-2", -2),
        ("0.5", 0.5),
        ("1e-6", 1e-6),
        ("true", True),
        ("False", False),
        ("None", None),
        ("cuda", "cuda"),
        ("[1,2]", [1, 2]),
        ("(1,2)", (1, 2)),
        ("1,2", [1, 2]),
        ("[a, b, c]", ["a", "b", "c"]),
        ("[(1,2),[3,4],x]", [(1, 2), [3, 4], "x"]),
        ("[]", []),
        ("()", ()),
        ("[1,]", [1]),
    ],
)
def test_values_parse_as_mmengine_parses_them(text, value):
    assert parse_cfg_value(text) == value
    assert type(parse_cfg_value(text)) is type(value)
    assert DictAction._parse_iterable(text) == value  # the same result as mmengine's own


@pytest.mark.parametrize(
    "text,value",
    [
        ("'1'", "1"),  # mmengine: 1 (it strips the quotes, then parses)
        ('"a b"', "a b"),  # mmengine: 'ab' (it drops every space)
        ("['x,y',z]", ["x,y", "z"]),  # a comma inside quotes stays in the string
        ("'/path/with,comma'", "/path/with,comma"),
    ],
)
def test_quoted_strings_stay_as_written(text, value):
    assert parse_cfg_value(text) == value


@pytest.mark.parametrize("text", ["[1,2", "(1,2))", "['a,b]"])
def test_unbalanced_values_are_errors(text):
    with pytest.raises(ValueError, match="unbalanced"):
        parse_cfg_value(text)


def test_cfg_options_takes_many_pairs_and_mixes_with_set():
    args = _args(
        "--cfg-options",
        "train_config.max_train_step=2",
        "rollout_config.response_length_range=[4,8]",
        "--set",
        "train_config.seed=7",
    )
    assert overrides(args) == {
        "train_config.max_train_step": 2,
        "rollout_config.response_length_range": [4, 8],
        "train_config.seed": 7,
    }


def test_the_later_flag_wins_and_dedicated_flags_win_over_both():
    args = _args("--set", "train_config.seed=1", "--cfg-options", "train_config.seed=2")
    assert overrides(args)["train_config.seed"] == 2
    args = _args("--cfg-options", "train_config.seed=2", "--set", "train_config.seed=1")
    assert overrides(args)["train_config.seed"] == 1
    args = _args("--max-steps", "5", "--cfg-options", "train_config.max_train_step=9")
    assert overrides(args)["train_config.max_train_step"] == 5


def test_forwarded_arguments_parse_back_to_the_same_overrides():
    args = _args(
        "--cfg-options",
        "a.b=[1,(2,3)]",
        "a.c='x y'",
        "a.d=None",
        "a.e=0.1",
        "--set",
        "a.f=True",
        "--pipe",
        "2",
        "--work-dir",
        "/tmp/w",
        "--resume",
        "auto",
        "--verbose",
    )
    again = _args(*forward_argv(args)[1:])
    assert overrides(again) == overrides(args)
    assert again.resume == "auto" and again.verbose


def test_a_pair_without_equals_is_one_line_exit_2(capsys):
    assert main(["plan", str(QWEN), "--cfg-options", "train_config.seed"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --cfg-options train_config.seed: expected KEY=VALUE"


def test_plan_takes_cfg_options(capsys):
    # colocate_all on one GPU; --cfg-options turns it off and the plan then needs 2 GPUs+.
    assert main(["plan", str(QWEN)]) == 0
    assert "needs 1 GPU" in capsys.readouterr().out
    code = main(
        [
            "plan",
            str(QWEN),
            "--cfg-options",
            "placement_config.colocate_all=False",
            "placement_config.gpus_per_node=8",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "needs 1 GPU" not in out, out


def test_bench_and_train_module_take_the_same_config_arguments():
    from rlhf_pipe import bench_cli, train

    p = argparse.ArgumentParser()
    bench_cli.add_parser(p.add_subparsers())
    args = p.parse_args(["bench", "c.py", "--pipe", "1,2", "--cfg-options", "a=1", "b=2,3"])
    assert overrides(args) == {"a": 1, "b": [2, 3]}  # bench's --pipe list is not an override
    args = train._parse(["c.py", "--cfg-options", "a=(1,2)", "--set", "b='x'", "--bench", "1"])
    assert overrides(args) == {"a": (1, 2), "b": "x"} and args.bench == "1"


def test_config_arguments_alone_have_no_run_flags():
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_args(["c.py", "--resume", "auto"])


def test_bad_set_pair_is_still_a_config_error():
    with pytest.raises(ConfigError, match="^--set x: expected KEY=VALUE$"):
        overrides(_args("--set", "x"))
