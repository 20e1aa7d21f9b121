"""examples/rlhf/tiny_grpo_cpu.py through the command line a user types: it trains, the
console stays ours, the libraries' logs land in WORK_DIR/logs, W&B (offline) gets the
metrics.jsonl names, and `rlhf-pipe report` draws the run."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.wandb_files import offline_run

pytestmark = pytest.mark.slow
GRPO = ROOT / "examples/rlhf/tiny_grpo_cpu.py"


def test_tiny_grpo_trains_with_a_quiet_console(tmp_path):
    pytest.importorskip("wandb")
    work = tmp_path / "grpo"
    cmd = [sys.executable, "-m", "rlhf_pipe", "train", str(GRPO), "--work-dir", str(work)]
    cmd += ["--max-steps", "3", "--cfg-options", "train_config.progress_bar=False"]
    cmd += ["train_config.loggers=[jsonl,wandb]", "train_config.wandb.project=grpo-test"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["reward"]) for r in rows)
    assert "critic/value_loss" not in rows[0] and "actor/kl_loss" in rows[0]

    console = proc.stdout + proc.stderr
    log = (work / "logs" / "rank0.log").read_text()
    for noise in ("Initializing a V1 LLM engine", "non-default args", "Failed to load weights"):
        assert noise not in console, noise
    assert "Initializing a V1 LLM engine" in log and "non-default args" in log
    assert " INFO " not in proc.stderr
    assert "step 3: reward=" in proc.stdout
    assert "mean reward: first 1 steps" in proc.stdout and "mean step time" in proc.stdout
    assert f"logs: {work / 'logs' / 'rank0.log'}" in proc.stdout

    run, logged = offline_run(work)
    assert run["project"] == "grpo-test" and len(logged) == 3
    numeric = {k for k, v in rows[-1].items() if isinstance(v, (int, float)) and k != "step"}
    assert {k for k in logged[-1] if not k.startswith("_")} == numeric

    report = subprocess.run(
        [sys.executable, "-m", "rlhf_pipe", "report", str(work)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    assert (work / "report.png").stat().st_size > 20_000
    assert f"last 1 steps {rows[-1]['reward']:.4f}" in report.stdout
