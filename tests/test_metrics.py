"""train_config.loggers and train_config.wandb: the same metric names in every tracker (W&B in
its real offline mode), and one-line config errors."""

import json

import pytest

from rlhf_pipe.cli import main
from rlhf_pipe.config import ConfigError, metric_loggers
from rlhf_pipe.metrics import MetricsLogger
from tests.conftest import TINY_CONFIG, tiny_config
from tests.wandb_files import offline_run

STEPS = [
    {"reward": 0.5, "reward/digits": 0.5, "actor/clip_frac": 0.1, "idle_frac/train": 0.3},
    {"reward": 0.7, "reward/digits": 0.7, "actor/clip_frac": 0.2, "idle_frac/train": 0.2},
]


def test_wandb_offline_run_holds_the_jsonl_metric_names(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(
        tmp_path,
        ("jsonl", "tensorboard", "wandb"),
        console=False,
        wandb={"project": "rlhf-pipe-test", "name": "tiny", "tags": ["ci", "cpu"]},
    )
    for step, metrics in enumerate(STEPS, 1):
        logger.log(step, metrics)
    logger.close()
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    run, rows = offline_run(tmp_path)
    assert run == {"project": "rlhf-pipe-test", "name": "tiny", "tags": ["ci", "cpu"]}
    assert len(rows) == len(jsonl)
    for row, record in zip(rows, jsonl):
        names = {k for k in row if not k.startswith("_")}  # W&B adds _step, _runtime, ...
        assert names == set(record) - {"step"}
        assert json.loads(row["reward"]) == record["reward"]
        assert json.loads(row["_step"]) == record["step"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_default_loggers_keep_the_tensorboard_switch(tmp_path):
    assert metric_loggers(tiny_config(tmp_path).train_config) == ("jsonl",)  # tensorboard=False
    cfg = tiny_config(tmp_path, **{"train_config.tensorboard": True})
    assert metric_loggers(cfg.train_config) == ("jsonl", "tensorboard")
    cfg = tiny_config(
        tmp_path, **{"train_config.tensorboard": True, "train_config.loggers": ["jsonl"]}
    )
    assert metric_loggers(cfg.train_config) == ("jsonl",)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"train_config.loggers": ["jsonl", "mlflow"]},
            "train_config.loggers: unknown logger 'mlflow' (known: jsonl, tensorboard, wandb)",
        ),
        (
            {"train_config.loggers": ["tensorboard"], "train_config.tensorboard": True},
            "train_config.loggers: must include 'jsonl' (report and resume read it)",
        ),
        (
            {"train_config.loggers": ["jsonl", "tensorboard"]},  # tiny_config: tensorboard=False
            "train_config.tensorboard: False, but train_config.loggers names 'tensorboard'",
        ),
        (
            {"train_config.wandb": {"projekt": "x"}},
            "train_config.wandb.projekt: unknown key (known: entity, group, name, notes, project, tags)",
        ),
        (
            {"train_config.wandb": {"tags": "a"}},
            "train_config.wandb.tags: expected a list of strings, got 'a'",
        ),
    ],
)
def test_bad_logger_settings_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match="^.*$") as e:
        tiny_config(tmp_path, **overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_logger_setting_exits_2_with_one_line(tmp_path, capsys):
    code = main(["train", str(TINY_CONFIG), "--cfg-options", "train_config.loggers=[jsonl,mlflow]"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        f"error: {TINY_CONFIG}: train_config.loggers: unknown logger 'mlflow' "
        "(known: jsonl, tensorboard, wandb)"
    )
