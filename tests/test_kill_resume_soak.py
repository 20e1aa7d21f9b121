"""Soak: `kill -9` a one-process `rlhf-pipe train` at seeded random moments, mid-generation,
mid-train and mid-checkpoint-write, then `--resume auto` each time. The run ends with the
weights of an uninterrupted run, bit for bit, and one metrics line per step, each step with
the samples of that run (none trained twice, none lost).

Where a kill lands is read from what the run shows: the stage progress bar on stderr (which
micro-batches Generate and Train have finished; tqdm flushes every update) and the `.tmp`
folder a checkpoint is written in. A kill is counted as the kinds that the evidence left at
its death shows, so a kill that came a few milliseconds late is not miscounted.

With max_staleness=1 (run-ahead) the generation thread generates step k+1 while step k
trains, so the bar's Generate count says nothing about generation. There the run is started
through PROBE, which marks each engine.generate call's start and end in a file (os.write:
the marks outlive a kill -9); "generate" means a mark of the aimed step's generation open at
death. A checkpoint of such a run holds the steps in flight, so the kills mid-checkpoint
and the resumes that follow test that those samples are trained once, after the resume.
Wall time here (2 shared cores): most of it is vLLM starting once per kill and once more
(s=1, 5 kills: 1.5 min in CI; s=0 has 3).
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
KINDS = ("checkpoint", "generate", "train")
# `rlhf-pipe train` with each generate call marked in $SOAK_MARKS (the real engine runs).
PROBE = """
import os, sys
import torch.distributed  # first, as rlhf_pipe.train.run imports it (exit hook order)
from rlhf_pipe.rollout.vllm_engine import VLLMEngine
fd = os.open(os.environ["SOAK_MARKS"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
generate = VLLMEngine.generate
def marked(self, *args):
    os.write(fd, b"start\\n")
    generate(self, *args)
    os.write(fd, b"end\\n")
VLLMEngine.generate = marked
from rlhf_pipe.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Run:
    """One `rlhf-pipe train --resume auto` process, its stderr read as it comes. With
    max_staleness s >= 1 it runs through PROBE; `first_gen` is the step its first generate
    call is for (a resumed run has the checkpoint's steps K..K+s: it starts at K+s+1)."""

    def __init__(self, work, s: int, number: int):
        self.started = time.time()
        self.s, self.marks = s, work.parent / f"marks_{number}"
        resumed_at = _newest_checkpoint(work) if (work / "checkpoints").exists() else 0
        self.first_gen = resumed_at + s + 1 if resumed_at else 0
        launch = ["-m", "rlhf_pipe"] if s == 0 else ["-c", PROBE]
        cmd = [sys.executable, *launch, "train", str(TINY_CONFIG)]
        cmd += ["--work-dir", str(work), "--max-steps", str(STEPS), "--resume", "auto"]
        for k, v in {**SETS, "train_config.max_staleness": s}.items():
            cmd += ["--set", f"{k}={v}"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        env["SOAK_MARKS"] = str(self.marks)
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

    def generating(self) -> int | None:
        """s >= 1: the step whose generation is open now, if one is."""
        marks = self.marks.read_text().split() if self.marks.exists() else []
        if not marks or marks[-1] != "start":
            return None
        return self.first_gen + marks.count("start") - 1

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._reader.join(10)


def _hit(kind, run, work, step) -> bool:
    if kind == "checkpoint":
        # Written by this process: a killed run's torn folder stays until the step is redone.
        tmp = work / "checkpoints" / f"step_{step:06d}.tmp"
        return tmp.is_dir() and tmp.stat().st_mtime > run.started
    if kind == "generate" and run.s:
        # While 1-based step `step` trains, the thread generates 0-based step `step` + s - 1;
        # aim one further, at `step` + s: a resumed run's first generation is K + s + 1.
        return run.generating() == step + run.s
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


# s=0: one kill of each kind (torchrun's kill-and-resume is tests/distributed/test_torchrun.py's).
# s=1: five kills, two each where run-ahead adds state (generation in flight, a checkpoint
# of in-flight samples). Generation's bar evidence is s=0's alone.
PLANS = {
    0: ["generate", "train", "checkpoint"],
    1: ["generate", "train", "checkpoint", "generate", "checkpoint"],
}


@pytest.mark.parametrize("s", [0, 1])
def test_kill_9_and_resume_auto_end_as_an_uninterrupted_run(
    tmp_path, fresh_engine, initial_policy_weights, s
):
    start = time.monotonic()
    rng = random.Random(17 + s)
    work = tmp_path / "soak"
    plan = list(PLANS[s])
    rng.shuffle(plan)
    landed = []  # (kind aimed at, kinds the evidence shows, step)
    while plan:
        kind = plan.pop(0)
        resumed_at = _newest_checkpoint(work) if (work / "checkpoints").exists() else 0
        step = resumed_at + rng.randint(1, 2)  # the step to strike in
        if step > STEPS:
            break
        run = Run(work, s, len(landed))
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
        shown = {k for k in KINDS if _hit(k, run, work, step)}
        landed.append((kind, sorted(shown), step))
        if kind not in shown and len(landed) < 12:
            plan.append(kind)  # missed by a few ms: aim at it again later
    final = Run(work, s, len(landed))
    final.proc.wait(300)
    final._reader.join(10)
    assert final.proc.returncode == 0, final.err.decode(errors="replace")[-3000:]
    wall = time.monotonic() - start
    kinds = {k for _, shown, _ in landed for k in shown}
    print(f"soak s={s}: {len(landed)} kills {landed}, {STEPS} steps, {wall:.0f} s")
    assert len(landed) >= len(PLANS[s])
    assert set(KINDS) <= kinds, landed

    # The same run without kills, in this process (its engine is the same vLLM build).
    over = {k: v for k, v in SETS.items() if k != "train_config.progress_bar"}
    straight = RLHFTrainer(
        tiny_config(tmp_path / "straight", **over, **{"train_config.max_staleness": s}),
        engine=fresh_engine,
        console=False,
    )
    history = straight.learn(STEPS)
    straight.close()
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))
    # Each step trained the uninterrupted run's samples: as many, generated by the same
    # policy versions, with the same rewards and losses.
    keys = ["samples", "reward", "actor/policy_loss", "critic/value_loss", "response_len"]
    keys += sorted({k for h in history for k in h if k.startswith("staleness/")})
    assert [[x.get(k) for k in keys] for x in lines] == [[h.get(k) for k in keys] for h in history]
    last = f"step_{STEPS:06d}"
    for part in ("actor", "critic"):
        a = _weights(work / "checkpoints" / last / part)
        b = _weights(tmp_path / "straight" / "run" / "checkpoints" / last / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
