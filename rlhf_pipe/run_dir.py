"""One run per work dir: a fresh run refuses a folder that holds another run; only a resume
continues one, and it first drops what the killed run wrote after its checkpoint.

A folder holds a run once it has any of metrics.jsonl, tensorboard/ or checkpoints/. We
refuse rather than make a timestamped sub-folder: mmengine (and XTuner on top of it) does put
each run's logs under `work_dir/<timestamp>/`, but writes checkpoints straight into work_dir,
which is how a second run silently replaced the first one's `step_000030`. With one folder per
run, `work_dir/checkpoints/step_N` and `--resume auto` keep meaning one run, and the user
chooses: continue it, or name a new folder.

While a run trains it holds an exclusive lock on `work_dir/run.lock`; the kernel drops it when
the process dies (kill -9 included), so a resume never waits on a stale lock, and two live
processes never write one folder.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from rlhf_pipe.checkpoint import CHECKPOINT_DIR, CheckpointError, complete_checkpoints

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = "run.lock"


class RunDirError(CheckpointError):
    """A one-line refusal (exit 2): the folder belongs to another run."""


def run_traces(work_dir: Path) -> list[str]:
    """What in work_dir shows a run has written there (empty: the folder is free)."""
    found = []
    metrics = work_dir / METRICS_FILE
    if metrics.exists() and metrics.stat().st_size > 0:
        found.append(METRICS_FILE)
    tb = work_dir / TENSORBOARD_DIR
    if tb.is_dir() and any(tb.iterdir()):
        found.append(f"{TENSORBOARD_DIR}/")
    ckpts = work_dir / CHECKPOINT_DIR
    if ckpts.is_dir():
        names = sorted(p.name for p in ckpts.iterdir())
        if names:
            found.append(f"{CHECKPOINT_DIR}/{names[-1]}")
    return found


def refuse_a_fresh_run(work_dir: str | Path) -> None:
    """A fresh run (no --resume) into a folder that holds another run: one line, exit 2. The
    CLI calls it before any model is built, the claim again when the run first writes."""
    traces = run_traces(Path(work_dir))
    if traces:
        raise RunDirError(
            f"{work_dir} holds another run ({', '.join(traces)}): continue it with --resume "
            f"auto, or give a new folder (--work-dir, train_config.work_dir)"
        )


class RunDir:
    """The claim of one work dir by one trainer; `close()` releases it."""

    def __init__(self, work_dir: str | Path, continue_from: int | None, checkpoint: Path | None):
        """continue_from None: a fresh run, the folder must be free. An int N: this run
        continues the folder's run after step N (N = 0 when `--resume auto` found no
        checkpoint); `checkpoint` is the one it resumed from, if any."""
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.dir / LOCK_FILE)
        try:
            self._check(continue_from, checkpoint)
            if continue_from is not None:
                drop_metrics_after(self.dir / METRICS_FILE, continue_from)
        except BaseException:
            self.close()
            raise
        # TensorBoard readers drop the earlier files' events at and after this step.
        self.purge_step = None if continue_from is None else continue_from + 1

    def _check(self, continue_from: int | None, checkpoint: Path | None) -> None:
        if continue_from is None:
            refuse_a_fresh_run(self.dir)
            return
        traces = run_traces(self.dir)
        same_dir = checkpoint is not None and checkpoint.resolve().parent == (
            (self.dir / CHECKPOINT_DIR).resolve()
        )
        if traces and checkpoint is not None and not same_dir:
            raise RunDirError(
                f"{self.dir} holds another run ({', '.join(traces)}): it is not the run of "
                f"{checkpoint}, or give a new folder (--work-dir, train_config.work_dir)"
            )
        later = [
            p.name
            for p in complete_checkpoints(self.dir)
            if int(p.name.removeprefix("step_")) > continue_from
        ]
        if later:
            # Training on would overwrite them one by one with another history.
            raise RunDirError(
                f"--resume {checkpoint}: {self.dir} has later checkpoints ({', '.join(later)}); "
                f"resume the newest (--resume auto) or into a new folder"
            )

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None


def _lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunDirError(
            f"{path.parent} is in use by another live run (pid {holder}); wait for it or "
            f"give a new folder (--work-dir, train_config.work_dir)"
        ) from None
    except OSError:  # a file system without flock (some NFS mounts): no lock, still a run
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def drop_metrics_after(path: Path, step: int) -> int:
    """Keep the lines of steps <= `step` (and no torn last line of a killed writer); the
    resumed run logs the later steps again. Returns how many lines were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped
