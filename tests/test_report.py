"""`rlhf-pipe report`: the PNG of a run's curves and the summary's numbers."""

import json
import math

import pytest

from rlhf_pipe.cli import main
from rlhf_pipe.report import PANELS, _keys, load_metrics, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path, steps=12):
    rows = []
    for step in range(1, steps + 1):
        rows.append(
            {
                "step": step,
                "reward": 0.1 * step,
                "reward/digits": 0.1 * step,
                "reward/length": 0.05 * step,
                "kl": 0.01 * step,
                "entropy": 6 - 0.1 * step,
                "response_len": 12.0,
                "actor/clip_frac": 0.02,
                "step_s": 0.5 + 0.01 * step,
                "samples_per_s": 32 / (0.5 + 0.01 * step),
                "idle_frac/generate": 0.2,
                "idle_frac/train": 0.6,
            }
        )
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 13, "rew')  # torn
    return rows


def test_report_writes_the_png_and_the_summary_matches_the_jsonl(tmp_path, capsys):
    rows = _run(tmp_path)
    out = tmp_path / "plots" / "curves.png"
    assert main(["report", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000  # 7 panels of curves, not a blank page
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    step_s = sum(r["step_s"] for r in rows) / len(rows)
    rate = sum(r["samples_per_s"] for r in rows) / len(rows)
    assert f"first 5 steps {first:.4f}, last 5 steps {last:.4f}" in printed
    assert f"12 steps: mean step time {step_s:.3f} s, {rate:.1f} samples/s" in printed
    assert f"report: {out}" in printed


def test_summary_numbers(tmp_path):
    rows = _run(tmp_path, steps=3)
    s = summarize(load_metrics(tmp_path / "metrics.jsonl"))  # the torn line is skipped
    assert s["steps"] == 3 and s["k"] == 1
    assert math.isclose(s["first_reward"], rows[0]["reward"])
    assert math.isclose(s["last_reward"], rows[-1]["reward"])


def test_panels_take_each_scorer_and_skip_missing_keys(tmp_path):
    records = load_metrics(_run(tmp_path) and tmp_path / "metrics.jsonl")
    wanted = dict(PANELS)
    assert _keys(records, wanted["reward"]) == ["reward", "reward/digits", "reward/length"]
    assert _keys(records, wanted["clip fraction"]) == ["actor/clip_frac"]  # no critic: GRPO
    assert _keys(records, wanted["idle fraction per stage"]) == [
        "idle_frac/generate",
        "idle_frac/train",
    ]


@pytest.mark.parametrize("content", [None, ""])
def test_no_metrics_is_one_line_exit_2(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
