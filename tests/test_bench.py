"""rlhf-pipe bench: the bound math by hand, then one real CPU bench of the tiny config."""

import argparse
import json
import math

import pytest

from rlhf_pipe.bench import (
    RUN_KEYS,
    STREAM_KEYS,
    STREAMING_PENDING,
    add_bounds,
    add_staleness,
    add_streaming,
    bound_stage_times,
    bounding_stage,
    busy_by_role,
    busy_by_stage,
    efficiency,
    ideal_bound,
    mean_and_stderr,
    round_ratios,
    run_ahead_bound,
    skipped_streaming,
    speedup,
    summarize_run,
    write_bench,
)
from rlhf_pipe.timeline import ROWS, chrome_trace, rows_of
from tests.conftest import TINY_CONFIG

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- the math


def test_ideal_bound_by_hand():
    times = {"generate": 6.0, "forward": 2.0, "train": 4.0}  # sum 12, max 6
    assert ideal_bound(times, 1) == 12.0  # serial: the sum
    assert ideal_bound(times, 2) == 6.0 + 6.0 / 2  # 9
    assert ideal_bound(times, 4) == 6.0 + 6.0 / 4  # 7.5
    assert bounding_stage(times) == "generate"
    # Many micro-batches: the bound tends to the longest stage.
    assert ideal_bound(times, 10_000) == pytest.approx(6.0, abs=1e-3)
    with pytest.raises(ValueError):
        ideal_bound(times, 0)


def test_efficiency_and_speedup_by_hand():
    assert efficiency(7.5, 10.0) == 0.75
    assert speedup(12.0, 8.0) == 1.5
    assert math.isnan(efficiency(1.0, 0.0))


def test_busy_and_bound_stages_from_a_timeline():
    timeline = [
        ("generate", -1, 0.0, 3.0),
        ("gen_mb", 0, 0.0, 1.0),
        ("gen_mb", 1, 1.0, 3.0),
        ("forward", 0, 1.0, 2.0),
        ("forward", 1, 3.0, 4.0),
        ("advantage", -1, 4.0, 4.5),
        ("train", 0, 4.5, 6.0),
        ("train", 1, 6.0, 7.5),
        ("optimizer", -1, 7.5, 8.0),
    ]
    busy = busy_by_stage(timeline)
    # gen_mb lies inside the whole-generation interval: not added twice.
    assert busy == {
        "generate": 3.0,
        "forward": 2.0,
        "advantage": 0.5,
        "train": 3.0,
        "optimizer": 0.5,
    }
    assert bound_stage_times(busy) == {"generate": 3.0, "forward": 2.5, "train": 3.5}


def test_role_busy_counts_overlapping_calls_once():
    timeline = [
        ("forward", 0, 0.0, 2.0),
        ("actor.forward", 0, 0.0, 1.0),
        ("critic.forward", 0, 0.0, 2.0),
        ("actor.train", 0, 0.5, 1.5),
        ("actor.forward", 1, 3.0, 4.0),
        ("critic.train", 0, 2.0, 2.5),
    ]
    # actor: [0, 1.5] (forward and train overlap in one process) + [3, 4]
    assert busy_by_role(timeline) == {"actor": 2.5, "critic": 2.5}
    assert busy_by_stage(timeline)["forward"] == 2.0  # role rows are not stage time


def _fake_step(scale, pipeline_s, step_s):
    tl = [
        ("generate", -1, 0.0, 2.0 * scale),
        ("forward", 0, 0.0, 1.0 * scale),
        ("train", 0, 0.0, 3.0 * scale),
    ]
    return {
        "timeline": tl,
        "pipeline_s": pipeline_s,
        "step_s": step_s,
        "samples_per_s": 4.0,
        "gen_tokens_per_s": 10.0,
        "response_len": 5.0,
        "sync/seconds": 0.1,
        "sync/gbps": 2.0,
        "sync/bytes": 1e6,
    }


def test_summarize_and_bounds_on_made_up_runs():
    # Serial: stages 2 + 1 + 3 = 6 s; measured pipeline 6.5 s, step 8 s.
    runs = {
        1: summarize_run(1, [_fake_step(1, 6.5, 8.0), _fake_step(1, 6.5, 8.0)], 16),
        2: summarize_run(2, [_fake_step(1, 5.0, 6.0), _fake_step(1, 4.0, 4.0)], 16, devices=2),
    }
    times = add_bounds(runs)
    assert times == {"generate": 2.0, "forward": 1.0, "train": 3.0}
    one, two = runs[1], runs[2]
    assert one["bound_s"] == 6.0 and one["efficiency"] == 6.0 / 6.5
    assert two["pipeline_s"] == 4.5 and two["step_s"] == 5.0
    assert two["bound_s"] == 3.0 + 3.0 / 2  # 4.5
    assert two["efficiency"] == 1.0 and two["speedup"] == 8.0 / 5.0
    assert two["bound_stage"] == "train"
    assert two["stages"]["generate"]["idle_s"] == (3.0 + 2.0) / 2  # 5-2, 4-2
    # 5 tokens x 16 samples / step_s, per device: (80/6 + 80/4) / 2 / 2
    assert two["tokens_per_s_per_device"] == pytest.approx((80 / 6 + 80 / 4) / 2 / 2)
    assert set(RUN_KEYS) <= set(two)
    assert two["roles"] == {}  # the made-up steps have no role calls


def test_device_bound_when_forward_and_train_share_a_gpu():
    # Serial: generate 2 s on GPU 0; actor forward 1 s + actor train 3 s on GPU 1. The stage
    # bound at M=2 is 3 + 3/2 = 4.5 s, but GPU 1 holds 4 s and GPU 0 only 2 s.
    def step(pipeline_s):
        tl = [
            ("generate", -1, 0.0, 2.0),
            ("forward", 0, 2.0, 3.0),
            ("actor.forward", 0, 2.0, 3.0),
            ("train", 0, 3.0, 6.0),
            ("actor.train", 0, 3.0, 6.0),
        ]
        return {**_fake_step(1, pipeline_s, pipeline_s), "timeline": tl}

    gpus = {"node 0 gpu 0": ("rollout",), "node 0 gpu 1": ("actor", "critic")}
    runs = {
        m: summarize_run(m, [step(6.0 if m == 1 else 5.0)], 16, device_roles=gpus)
        for m in (1, 2, 8)
    }
    add_bounds(runs)
    assert runs[1]["devices_busy"]["node 0 gpu 1"]["busy_s"] == 4.0
    assert runs[1]["devices_busy"]["node 0 gpu 0"]["idle_s"] == 4.0
    assert runs[2]["device_bound_s"] == 4.5 and runs[2]["bound_stage"] == "train"  # stage bound
    assert runs[8]["bound_s"] == 3.0 + 3.0 / 8
    assert runs[8]["device_bound_s"] == 4.0  # GPU 1 is the floor at deep M
    assert runs[8]["bound_stage"] == "node 0 gpu 1 (actor + critic)"
    assert runs[8]["device_efficiency"] == 4.0 / 5.0


def test_streaming_rounds_cancel_linear_drift():
    # Calls slow down by 0.1 s each; A and B cost the same: every A B B A round gives 1.0.
    order = ["stream", "plain", "plain", "stream"] * 2
    call_s = [1.0 + 0.1 * i for i in range(8)]
    assert round_ratios(order, call_s) == pytest.approx([1.0, 1.0])
    # B 10% slower than A in one round: plain / stream seconds = 1.1
    assert round_ratios(order[:4], [1.0, 1.1, 1.1, 1.0]) == pytest.approx([1.1])
    mean, se = mean_and_stderr([1.0, 1.2])
    assert mean == pytest.approx(1.1) and se == pytest.approx(0.1)


def test_runs_are_written_before_the_streaming_check(tmp_path):
    """A bench stopped during its last, optional streaming check keeps its runs' report."""
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path)
    runs = {m: summarize_run(m, [_fake_step(1, 6.5, 8.0)], 16) for m in (1, 2)}
    timelines = {m: _fake_step(1, 6.5, 8.0)["timeline"] for m in (1, 2)}
    result = write_bench(
        TINY_CONFIG,
        cfg,
        runs,
        timelines,
        skipped_streaming("vllm", STREAMING_PENDING),
        tmp_path / "b",
        devices=1,
        command="rlhf-pipe bench x",
        steps=1,
        warmup=0,
    )
    written = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert written["runs"]["2"]["bound_s"] == 4.5 and "out_dir" not in written
    assert STREAMING_PENDING in (tmp_path / "b" / "report.md").read_text()
    add_streaming(
        result,
        {
            **skipped_streaming("vllm", "measured"),
            "ratio": 0.99,
            "stream_tokens_per_s": 99.0,
            "plain_tokens_per_s": 100.0,
        },
    )
    written = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert written["streaming"]["ratio"] == 0.99 and written["runs"]["2"]["bound_s"] == 4.5
    assert "ratio **0.990**" in (tmp_path / "b" / "report.md").read_text()


def test_run_ahead_bound_by_hand():
    times = {"generate": 2.0, "forward": 1.0, "train": 3.0}
    # generation beside the other two stages: max(2, 3 + 1 / M), or a busier device
    assert run_ahead_bound(times, 0.0, 1) == 4.0
    assert run_ahead_bound(times, 0.0, 2) == 3.5
    assert run_ahead_bound({**times, "train": 0.5}, 0.0, 4) == 2.0  # generation bounds it
    assert run_ahead_bound(times, 6.0, 4) == 6.0  # one device holds all 6 s


def test_staleness_table_spans_and_predictions_in_the_report(tmp_path):
    from tests.conftest import tiny_config

    runs = {m: summarize_run(m, [_fake_step(1, 6.5, 8.0)], 16) for m in (1, 2)}
    result = write_bench(
        TINY_CONFIG,
        tiny_config(tmp_path),
        runs,
        {m: _fake_step(1, 6.5, 8.0)["timeline"] for m in (1, 2)},
        skipped_streaming("vllm", STREAMING_PENDING),
        tmp_path / "b",
        devices=1,
        command="rlhf-pipe bench x",
        steps=2,
        warmup=1,
    )
    ahead = {0: runs, 1: {m: summarize_run(m, [_fake_step(1, 4.0, 5.0)], 16) for m in (1, 2)}}
    # step 1 measured (warm-up 1): its generation ran during step 0, step 2's during step 1
    train = [(0, 10.0, 11.0), (1, 11.0, 12.0)]
    gen = [(0, 9.5, 10.5), (1, 10.5, 11.0), (2, 11.25, 11.75), (3, 12.0, 12.5), (4, 12.5, 13)]
    add_staleness(result, ahead, {1: {1: (train, gen), 2: (train, gen)}}, warmup=1)
    written = json.loads((tmp_path / "b" / "bench.json").read_text())
    table = written["staleness"]
    assert set(table) == {"s0_pipe1", "s0_pipe2", "s1_pipe1", "s1_pipe2"}
    assert table["s1_pipe2"]["speedup"] == 8.0 / 5.0
    # s=0: the run's device bound (no devices: the stage bound); s=1: max(2, 3 + 1 / M)
    assert table["s0_pipe2"]["device_bound_s"] == 4.5
    assert table["s1_pipe1"]["device_bound_s"] == 4.0
    assert table["s1_pipe2"]["device_bound_s"] == 3.5
    assert table["s1_pipe2"]["device_efficiency"] == 3.5 / 4.0
    # From the first measured span's start (generation of step 1 at 10.5 s), steps 1 to 3
    assert written["staleness_spans"]["s1_pipe1"] == {
        "train": [[1, 0.5, 1.5]],
        "generate": [[1, 0.0, 0.5], [2, 0.75, 1.25], [3, 1.5, 2.0]],
    }
    assert written["predictions"]["layouts"]["2"]["s1"]["2"]["bounded_by"]
    report = (tmp_path / "b" / "report.md").read_text()
    assert "| 1 | 2 | 5.000 | 4.000 | 1.60 | 3.500 | 0.88 |" in report
    assert "## Predictions for 2, 4 and 8 GPUs" in report
    assert "| measured | this bench's own layout | 8.000 | 8.000 | 5.000 | 5.000 | | |" in report


def test_role_calls_get_rows_of_their_own():
    timeline = [
        ("forward", 0, 0.0, 1.0),
        ("critic.train", 0, 1.0, 2.0),
        ("actor.forward", 0, 0.0, 0.5),
    ]
    assert rows_of(timeline) == list(ROWS) + ["actor", "critic"]
    trace = chrome_trace(timeline)
    names = {
        e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"
    }
    tid = {e["name"]: e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert names[tid["critic.train mb0"]] == "critic" and names[tid["actor.forward mb0"]] == "actor"


def test_chrome_trace_has_one_thread_per_row_and_microseconds():
    trace = chrome_trace([("forward", 2, 0.5, 0.75), ("optimizer", -1, 1.0, 1.25)])
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["ts"], e["dur"]) for e in events] == [
        ("forward mb2", 500000.0, 250000.0),
        ("optimizer all", 1000000.0, 250000.0),
    ]
    names = {
        e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"
    }
    assert names[events[0]["tid"]] == "forward" and names[events[1]["tid"]] == "train/optimizer"


# ---------------------------------------------------------------------- the real bench


@pytest.mark.slow
def test_cpu_bench_of_the_tiny_config(tmp_path, vllm_engine, capsys):
    from rlhf_pipe.bench_cli import add_parser, cmd_bench

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "bench"
    args = parser.parse_args(
        [
            "bench",
            str(TINY_CONFIG),
            "--pipe",
            "1,4",
            "--steps",
            "3",
            "--out",
            str(out),
            "--set",
            "train_config.progress_bar=False",
            "--set",
            "train_config.tensorboard=False",
            "--set",
            f"train_config.work_dir={tmp_path / 'run'}",
        ]
    )
    assert args.fn is cmd_bench
    assert cmd_bench(args, engine=vllm_engine) == 0
    assert "streaming overhead" in capsys.readouterr().out

    for m in (1, 4):
        png = out / f"timeline_pipe{m}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        trace = json.loads((out / f"trace_pipe{m}.json").read_text())
        stages = {e["cat"] for e in trace["traceEvents"] if e["ph"] == "X"}
        assert {"generate", "gen_mb", "forward", "advantage", "train", "optimizer"} <= stages
        mbs = sorted(
            e["args"]["micro_batch"] for e in trace["traceEvents"] if e.get("cat") == "train"
        )
        assert mbs == list(range(m))
        # each role's calls, per micro-batch, on the role rows
        for name in (
            "actor.forward",
            "critic.forward",
            "reference.forward",
            "actor.train",
            "critic.train",
        ):
            assert sorted(
                e["args"]["micro_batch"] for e in trace["traceEvents"] if e.get("cat") == name
            ) == list(range(m)), name
    assert (out / "timeline.png").read_bytes()[:8] == PNG_MAGIC

    result = json.loads((out / "bench.json").read_text())
    assert result["pipes"] == [1, 4] and result["steps"] == 3 and result["warmup"] == 1
    assert result["versions"]["torch"].startswith("2.") and result["device"]
    report = (out / "report.md").read_text()
    assert result["command"] in report and "| 4 |" in report and "| critic |" in report
    for m in ("1", "4"):
        run = result["runs"][m]
        assert set(RUN_KEYS) <= set(run), set(RUN_KEYS) - set(run)
        assert run["steps_measured"] == 3
        for stage in ("generate", "forward", "train"):
            assert run["stages"][stage]["busy_s"] > 0
            assert run["stages"][stage]["idle_s"] >= 0
        assert run["sync_gbps"] > 0 and run["sync_bytes"] > 0
        assert set(run["roles"]) == {"actor", "critic", "reference", "reward"}
        assert all(0 < r["busy_s"] <= run["pipeline_s"] for r in run["roles"].values())
        # One process, one device: it is busy at least as long as any role or stage on it.
        device = run["devices_busy"]["device 0"]
        assert max(r["busy_s"] for r in run["roles"].values()) <= device["busy_s"]
        assert run["stages"]["generate"]["busy_s"] <= device["busy_s"] <= run["pipeline_s"]
    serial, piped = result["runs"]["1"], result["runs"]["4"]
    # Pipeline regression guard: the tiny model gains little from overlap, but a pipeline that
    # serialises micro-batches or stalls on a channel is far slower than this.
    assert piped["pipeline_s"] <= 1.5 * serial["pipeline_s"], (
        piped["pipeline_s"],
        serial["pipeline_s"],
    )
    assert piped["bound_s"] < serial["bound_s"]  # more micro-batches, lower bound
    for key in ("speedup", "efficiency"):
        assert math.isfinite(piped[key]) and piped[key] > 0
    assert piped["bound_stage"] in (
        "generate",
        "forward",
        "train",
        "device 0 (rollout + actor + critic + reference + reward)",
    )
    assert piped["device_bound_s"] >= piped["bound_s"]
    assert piped["device_bound_s"] == max(
        piped["bound_s"], serial["devices_busy"]["device 0"]["busy_s"]
    )

    st = result["streaming"]
    assert set(STREAM_KEYS) <= set(st)
    assert math.isfinite(st["ratio"]) and st["ratio"] > 0
    assert st["same_tokens"] is True  # same prompts and seeds: the two calls answer alike
    assert st["queue_puts"] == 2 * 3 * 16  # two streaming calls a round, 16 prompts a call
    assert 0 < st["queue_put_share"] < 0.05
    assert len(st["round_ratios"]) == 3 and "Direct cost" in report


@pytest.mark.slow
def test_cpu_bench_with_run_ahead(tmp_path, vllm_engine):
    """`rlhf-pipe bench --staleness 0,1` in one process: a trainer per (s, M) on one engine,
    the staleness table with its device bounds, the spans, and the predictions."""
    from rlhf_pipe.bench import run_bench

    out = tmp_path / "bench"
    over = {
        "train_config.progress_bar": False,
        "train_config.tensorboard": False,
        "train_config.work_dir": str(tmp_path / "run"),
    }
    result = run_bench(
        TINY_CONFIG,
        [1, 2],
        2,
        0,
        out,
        over,
        engine=vllm_engine,
        log=lambda _: None,
        streaming_rounds=1,
        staleness=[1],
    )
    assert set(result["staleness"]) == {f"s{s}_pipe{m}" for s in (0, 1) for m in (1, 2)}
    assert all(row["device_bound_s"] > 0 for row in result["staleness"].values())
    for m in (1, 2):
        spans = result["staleness_spans"][f"s1_pipe{m}"]
        train = {j: (a, b) for j, a, b in spans["train"]}
        gen = {j: (a, b) for j, a, b in spans["generate"]}
        assert gen[1][0] < train[0][1], spans  # step 1 generated while step 0 trains
    one = result["predictions"]["layouts"]["1"]
    assert one["devices_busy_s"]["gpu 0"] > 0
    report = (out / "report.md").read_text()
    assert "## Predictions for 2, 4 and 8 GPUs" in report and "s1_pipe2: g generate" in report
