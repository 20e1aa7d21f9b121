"""Soak: `kill -9` a one-process `rlhf-pipe train` at seeded random moments, mid-generation,
mid-train and mid-checkpoint-write, then `--resume auto` each time. The run ends with the
weights of an uninterrupted run, bit for bit, and one metrics line per step.

Where a kill lands is read from what the run shows: the stage progress bar on stderr (which
micro-batches Generate and Train have finished; tqdm flushes every update) and the `.tmp`
folder a checkpoint is written in. A kill is counted as the kind that the evidence left at
its death shows, so a kill that came a few milliseconds late is not miscounted.
Wall time here (2 shared cores): about 4 minutes, most of it vLLM starting 7 times.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import ROOT, TINY_CONFIG, tiny_config

pytestmark = pytest.mark.slow
STEPS = 10
M = 4  # PIPE_MICRO_BATCH_NUM of the tiny config
SETS = {
    "train_config.save_interval": 1,
    "train_config.tensorboard": False,
    "train_config.progress_bar": True,  # the phase evidence
    "train_config.stage_timeout_s": 60,
}
BAR = re.compile(r"step (\d+):[^\r\n]*?\|(?:.*G:(\d+)/\d+ F:(\d+)/\d+ T:(\d+)/\d+)?")


class Run:
    """One `rlhf-pipe train --resume auto` process, its stderr read as it comes."""

    def __init__(self, work):
        self.started = time.time()
        cmd = [sys.executable, "-m", "rlhf_pipe", "train", str(TINY_CONFIG)]
        cmd += ["--work-dir", str(work), "--max-steps", str(STEPS), "--resume", "auto"]
        for k, v in SETS.items():
            cmd += ["--set", f"{k}={v}"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.err = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            self.err += chunk

    def bar(self):
        """(step, generated, trained) of the last progress update; generated/trained are 0
        before the step's first update. None before the first step."""
        text = self.err[-4096:].decode(errors="replace")
        for segment in reversed(re.split(r"[\r\n]", text)):
            m = BAR.match(segment)
            if m:
                return int(m[1]), int(m[2] or 0), int(m[4] or 0)
        return None

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._reader.join(10)


def _hit(kind, run, work, step) -> bool:
    if kind == "checkpoint":
        # Written by this process: a killed run's torn folder stays until the step is redone.
        tmp = work / "checkpoints" / f"step_{step:06d}.tmp"
        return tmp.is_dir() and tmp.stat().st_mtime > run.started
    bar = run.bar()
    if bar is None or bar[0] != step - 1:  # the bar counts steps from 0, checkpoints from 1
        return False
    _, generated, trained = bar
    return generated < M if kind == "generate" else generated == M and trained < M


def _newest_checkpoint(work) -> int:
    done = [p for p in (work / "checkpoints").glob("step_*") if (p / "COMPLETE").exists()]
    return max((int(p.name[5:]) for p in done), default=0)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_kill_9_and_resume_auto_end_as_an_uninterrupted_run(
    tmp_path, fresh_engine, initial_policy_weights
):
    start = time.monotonic()
    rng = random.Random(17)
    work = tmp_path / "soak"
    plan = ["generate", "train", "checkpoint", "generate", "train", "checkpoint"]
    rng.shuffle(plan)
    landed = []  # (kind aimed at, kind the evidence shows, step)
    while plan:
        kind = plan.pop(0)
        resumed_at = _newest_checkpoint(work) if (work / "checkpoints").exists() else 0
        step = resumed_at + rng.randint(1, 2)  # the step to strike in
        if step > STEPS:
            break
        run = Run(work)
        try:
            deadline = time.monotonic() + 240
            while not _hit(kind, run, work, step):
                assert run.proc.poll() is None, run.err.decode(errors="replace")[-3000:]
                assert time.monotonic() < deadline, f"never saw {kind} of step {step}"
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.01))  # somewhere inside the phase
        finally:
            run.kill()
        assert run.proc.returncode == -signal.SIGKILL
        shown = next(
            (k for k in ("checkpoint", "generate", "train") if _hit(k, run, work, step)), None
        )
        landed.append((kind, shown, step))
        if shown != kind and len(landed) < 12:
            plan.append(kind)  # missed by a few ms: aim at it again later
    final = Run(work)
    final.proc.wait(300)
    final._reader.join(10)
    assert final.proc.returncode == 0, final.err.decode(errors="replace")[-3000:]
    wall = time.monotonic() - start
    kinds = [shown for _, shown, _ in landed]
    print(f"soak: {len(landed)} kills {landed}, {STEPS} steps, {wall:.0f} s")
    assert len(landed) >= 5
    assert {"generate", "train", "checkpoint"} <= set(kinds), landed

    # The same run without kills, in this process (its engine is the same vLLM build).
    over = {k: v for k, v in SETS.items() if k != "train_config.progress_bar"}
    straight = RLHFTrainer(
        tiny_config(tmp_path / "straight", **over), engine=fresh_engine, console=False
    )
    history = straight.learn(STEPS)
    straight.close()
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))
    assert [x["reward"] for x in lines] == [h["reward"] for h in history]
    last = f"step_{STEPS:06d}"
    for part in ("actor", "critic"):
        a = _weights(work / "checkpoints" / last / part)
        b = _weights(tmp_path / "straight" / "run" / "checkpoints" / last / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
