"""`make demo`'s command, shortened: reward rises, metrics and checkpoints are written."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY_CONFIG

pytestmark = pytest.mark.slow


def test_tiny_demo_learns_and_writes_outputs(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_pipe",
            "train",
            str(TINY_CONFIG),
            "--work-dir",
            str(work),
            "--set",
            "train_config.save_interval=10",
            "--set",
            "train_config.progress_bar=False",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert "mean reward: first 5 steps" in proc.stdout
    for key in (
        "kl",
        "entropy",
        "actor/policy_loss",
        "critic/value_loss",
        "actor/clip_frac",
        "busy_s/generate",
        "idle_frac/train",
        "step_s",
        "samples_per_s",
        "sync/seconds",
    ):
        assert key in rows[-1]
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (work / "checkpoints").iterdir())
    assert ckpts == ["step_000010", "step_000020", "step_000030"]
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(work / "checkpoints/step_000030/actor")
    AutoModelForSequenceClassification.from_pretrained(work / "checkpoints/step_000030/critic")
