"""One run per work dir (rlhf_pipe/run_dir.py): a second run is refused, only a resume
continues one, and a resumed run keeps one metrics line (and TensorBoard point) per step."""

import json
import subprocess
import sys

import pytest

from rlhf_pipe.checkpoint import MARKER
from rlhf_pipe.run_dir import RunDir, RunDirError, drop_metrics_after
from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import ROOT, tiny_config


def _metrics(path, *steps, torn=""):
    path.write_text(
        "".join(json.dumps({"step": s, "reward": 0.1 * s}) + "\n" for s in steps) + torn
    )


def _checkpoint(work, step):
    folder = work / "checkpoints" / f"step_{step:06d}"
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(f"{step}\n")
    return folder


def test_a_fresh_run_refuses_a_folder_with_another_run(tmp_path):
    RunDir(tmp_path / "new", None, None).close()  # free (and made)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("a user's file is no run")
    RunDir(tmp_path / "other", None, None).close()
    for name, make in (
        ("metrics", lambda w: _metrics(w / "metrics.jsonl", 1)),
        ("ckpt", lambda w: _checkpoint(w, 30)),
        ("tb", lambda w: (w / "tensorboard").mkdir() or (w / "tensorboard" / "ev").touch()),
    ):
        work = tmp_path / name
        work.mkdir()
        make(work)
        with pytest.raises(RunDirError, match=r"holds another run \(.*\): continue it with "):
            RunDir(work, None, None)
    # A checkpoint of another folder does not make this folder's run its own.
    elsewhere = _checkpoint(tmp_path / "a", 2)
    with pytest.raises(RunDirError, match="it is not the run of"):
        RunDir(tmp_path / "metrics", 2, elsewhere)
    RunDir(tmp_path / "fresh_for_it", 2, elsewhere).close()


def test_resume_drops_the_lines_after_the_checkpoint_and_refuses_later_checkpoints(tmp_path):
    _metrics(tmp_path / "metrics.jsonl", 1, 2, 3, 4, torn='{"step": 5, "rew')
    two = _checkpoint(tmp_path, 2)
    run = RunDir(tmp_path, 2, two)
    run.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert run.purge_step == 3
    _checkpoint(tmp_path, 4)
    with pytest.raises(RunDirError, match=r"has later checkpoints \(step_000004\)"):
        RunDir(tmp_path, 2, two)
    # `--resume auto` with no checkpoint: the run starts again, none of its lines stay.
    _metrics(tmp_path / "m.jsonl", 1, 2)
    assert drop_metrics_after(tmp_path / "m.jsonl", 0) == 2
    assert (tmp_path / "m.jsonl").read_text() == ""


_HOLDER = """
import sys, time
from rlhf_pipe.run_dir import RunDir
RunDir(sys.argv[1], None, None)
print("held", flush=True)
time.sleep(60)
"""


def test_a_live_run_locks_its_folder_and_kill_9_frees_it(tmp_path):
    first = RunDir(tmp_path, None, None)
    with pytest.raises(RunDirError, match=r"in use by another live run \(pid \d+\)"):
        RunDir(tmp_path, 0, None)
    first.close()
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"pid {proc.pid}"):
            RunDir(tmp_path, 0, None)
        proc.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        proc.wait(30)
    finally:
        proc.kill()
    RunDir(tmp_path, 0, None).close()


def _steps(work):
    return [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_steps(work, tag="reward"):
    """The steps a TensorBoard reader shows for `tag`, over every event file of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_second_run_is_refused_and_resume_continues_without_duplicates(tmp_path, fresh_engine):
    over = {"train_config.save_interval": 2, "train_config.tensorboard": True}
    work = tmp_path / "run"
    first = RLHFTrainer(tiny_config(tmp_path, **over), engine=fresh_engine, console=False)
    first.learn(3)
    first.close()
    kept = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert _steps(work) == [1, 2, 3]

    second = RLHFTrainer(tiny_config(tmp_path, **over), engine=fresh_engine, console=False)
    with pytest.raises(RunDirError, match="holds another run.*--resume auto"):
        second.learn(3)
    second.close()
    # Nothing of the first run changed (the lock file aside, which holds the last pid).
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file() and p.name != "run.lock"} == {
        p: b for p, b in kept.items() if p.name != "run.lock"
    }

    # As if killed after step 3 was logged and before its checkpoint: resume from step 2.
    import shutil

    shutil.rmtree(work / "checkpoints" / "step_000003")
    third = RLHFTrainer(tiny_config(tmp_path, **over), engine=fresh_engine, console=False)
    assert third.resume("auto").name == "step_000002"
    history = third.learn(4)
    third.close()
    assert len(history) == 2
    assert _steps(work) == [1, 2, 3, 4]
    assert len(list((work / "tensorboard").iterdir())) == 2  # a new event file...
    assert _tensorboard_steps(work) == [1, 2, 3, 4]  # ...that hides the old file's step 3


def test_the_cli_refuses_a_used_folder_before_building_anything(tmp_path):
    """`rlhf-pipe train` into another run's folder: one line, exit 2, and nothing built or
    written first (not even the log folder that the console set-up makes)."""
    from tests.conftest import TINY_CONFIG

    work = tmp_path / "used"
    work.mkdir()
    (work / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted(p.name for p in work.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_pipe", "train", str(TINY_CONFIG), "--work-dir", str(work)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {work} holds another run (metrics.jsonl): continue it with --resume auto, "
        f"or give a new folder (--work-dir, train_config.work_dir)"
    ]
    assert sorted(p.name for p in work.iterdir()) == before
