"""cli.py: the commands it knows and the exit codes of a wrong command line."""

import pytest

from rlhf_pipe.cli import main, user_errors
from rlhf_pipe.config import ConfigError


def test_user_errors_are_the_fixable_ones():
    errors = user_errors()
    assert ConfigError in errors
    assert RuntimeError not in errors


@pytest.mark.parametrize("argv", [["no-such-command"], []])
def test_a_wrong_command_line_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "bench", "plan", "report", "export"):
        assert command in out
