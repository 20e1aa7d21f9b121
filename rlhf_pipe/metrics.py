"""Per-step metrics to the console and the trackers (metrics.jsonl, TensorBoard, W&B); a live
progress bar. Every tracker gets the same metric names: the keys of metrics.jsonl."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

CONSOLE_KEYS = (
    "reward",
    "kl",
    "entropy",
    "actor/policy_loss",
    "critic/value_loss",
    "actor/clip_frac",
    "response_len",
    "step_s",
    "samples_per_s",
    "idle_frac/train",
    "sync/seconds",
)


class MetricsLogger:
    """`loggers`: 'jsonl' (always written), 'tensorboard', 'wandb'. `wandb`: the keyword
    arguments of wandb.init (project, name, tags, ...); the run's files go under work_dir."""

    def __init__(
        self,
        work_dir: str | Path,
        loggers: Sequence[str] = ("jsonl", "tensorboard"),
        console: bool = True,
        wandb: dict | None = None,
        purge_step: int | None = None,
    ):
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.dir / "metrics.jsonl"
        self.console = console
        self._tb = None
        self._wandb = None
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run's new event file hides the killed run's later steps.
                self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge_step)
            except ImportError:
                logger.warning("tensorboard is not installed; metrics go to JSONL only")
        if "wandb" in loggers:
            import wandb as wandb_module  # an optional extra; config validation checked it

            self._wandb = wandb_module.init(
                dir=str(self.dir),
                settings=wandb_module.Settings(quiet=True),
                **(wandb or {}),
            )

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a crash must not lose the steps already reported
        scalars = {
            k: v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self.console:
            shown = " ".join(f"{_short(k)}={_fmt(record[k])}" for k in CONSOLE_KEYS if k in record)
            print(f"step {step}: {shown}", flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v


def _short(key: str) -> str:
    """'actor/policy_loss' -> 'policy_loss' on the console; other keys stay whole."""
    if key.count("/") == 1 and key.startswith(("actor", "critic")):
        return key.split("/")[-1]
    return key


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class StageProgress:
    """A tqdm bar per step whose postfix shows which micro-batch each stage has finished."""

    def __init__(self, step: int, num_micro_batches: int, enabled: bool):
        self._lock = threading.Lock()
        self._done = {"generate": 0, "forward": 0, "train": 0}
        self._m = num_micro_batches
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=3 * num_micro_batches,
                desc=f"step {step}",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def __call__(self, stage: str, micro_batch: int) -> None:
        if self._bar is None or stage not in self._done:
            return
        with self._lock:
            self._done[stage] += 1
            self._bar.set_postfix_str(
                " ".join(f"{s[0].upper()}:{n}/{self._m}" for s, n in self._done.items())
            )
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
