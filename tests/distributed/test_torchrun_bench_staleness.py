"""`rlhf_pipe.train --bench 1,2 --staleness 0,1` under torchrun (gloo, CPU, 2 ranks: vLLM on
the controller, actor + critic + reference in one process): every (s, M) in one launch, the
staleness table and report section of the one-process bench, step k+1's generation running
while step k trains, and the distributed bench's own parts: the roles' ranks mapped to devices
(CPU ranks share the host: one device), their call and on-rank seconds, and streaming."""

import json
import math

import pytest

from tests.distributed.test_torchrun import _torchrun

pytestmark = pytest.mark.slow


def test_torchrun_bench_runs_every_staleness_and_pipe(tmp_path):
    out = tmp_path / "bench"
    proc = _torchrun(
        2,
        tmp_path / "run",
        10,
        (
            "placement_config.colocate_actor_ref=True",
            "placement_config.colocate_actor_critic=True",
            "train_config.stage_timeout_s=240",  # vLLM's start on 2 busy cores can take 60 s
        ),
        args=["--bench", "1,2", "--staleness", "0,1", "--steps", "2", "--warmup", "0"]
        + ["--out", str(out), "--streaming-rounds", "1"],
    )
    assert proc.returncode == 0, "\n".join(
        line for line in proc.stderr.splitlines() if "error" in line.lower()
    )[-3000:]
    assert "staleness 1 pipe 2: step" in proc.stdout
    result = json.loads((out / "bench.json").read_text())
    assert result["processes"] == "torchrun, 2 ranks"
    table = result["staleness"]
    assert set(table) == {f"s{s}_pipe{m}" for s in (0, 1) for m in (1, 2)}
    for name, row in table.items():
        assert row["step_s"] > 0 and math.isfinite(row["speedup"]), name
        assert row["device_bound_s"] > 0, name
    assert table["s0_pipe1"]["speedup"] == 1.0
    for m in (1, 2):
        spans = result["staleness_spans"][f"s1_pipe{m}"]
        train = {j: (a, b) for j, a, b in spans["train"]}
        gen = {j: (a, b) for j, a, b in spans["generate"]}
        assert sorted(train) == [0, 1], spans  # steps count from each run's first
        # Step 1 is generated while step 0 trains: it starts before step 0's train_step ends.
        assert gen[1][0] < train[0][1], spans
    assert set(result["predictions"]["layouts"]) == {"1", "2", "4", "8"}
    assert result["pipes"] == [1, 2]
    for run in result["runs"].values():
        cpu = run["devices_busy"]["cpu"]
        assert cpu["roles"] == ["rollout", "actor", "critic", "reference"]
        assert 0 < cpu["busy_s"] <= run["pipeline_s"]
        assert run["device_bound_s"] >= run["bound_s"]
        # Roles on the other rank: the controller's seconds in their calls, and of those the
        # seconds inside the method there; the rest is transport and waiting.
        for role in ("actor", "critic", "reference"):
            row = run["roles"][role]
            assert 0 < row["on_rank_s"] < row["call_s"], (role, row)
    assert result["streaming"]["queue_puts"] == 2 * 16
    report = (out / "report.md").read_text()
    assert "## Run-ahead (train_config.max_staleness)" in report
    assert "s1_pipe2: g generate (run-ahead thread), T train_step" in report
    assert "## Predictions for 2, 4 and 8 GPUs" in report
    assert "| role on another rank |" in report
    assert report.count("| cpu | rollout, actor, critic, reference |") >= 2
