"""The trainer's state on disk: the work-dir claim, checkpoints, and the exact resume.

`TrainerState` holds every object whose state the next step depends on besides the model
weights; `RunFolder` owns work_dir (claimed once, rlhf_pipe/run_dir.py) and the metrics logger.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlhf_pipe.checkpoint import STATE_FILE, CheckpointError, write_checkpoint
from rlhf_pipe.config import TrainConfig, metric_loggers
from rlhf_pipe.data import PromptSource, RelayBuffer
from rlhf_pipe.metrics import MetricsLogger
from rlhf_pipe.run_dir import RunDir
from rlhf_pipe.step_plan import PretrainMix


@dataclass
class TrainerState:
    """The resumable parts of a run, besides the step and version counters."""

    actor: object
    critic: object | None
    prompts: PromptSource
    ptx: PretrainMix | None
    relay: RelayBuffer
    running: object  # the pipeline's running reward statistics

    def state_dict(self, step: int, version: int) -> dict:
        state = {
            "step": step,
            "version": version,
            "actor": self.actor.training_state(),
            "data": self.prompts.state_dict(),
            "ptx": self.ptx.sampler.state_dict() if self.ptx else None,
            "relay": self.relay.state_dict(),
            "running_rewards": self.running.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
        }
        if self.critic is not None:
            state["critic"] = self.critic.training_state()
        return state

    def load(self, path: Path) -> dict:
        """Load checkpoint `path` (weights, optimizer, data positions, RNG); -> the whole saved
        state, whose 'step' and 'version' the trainer takes (and 'run_ahead', if any)."""
        state = torch.load(path / STATE_FILE, weights_only=False)
        for part, role in (("actor", self.actor), ("critic", self.critic)):
            if role is None:
                continue
            role.load_weights_from(str(path / part))
            try:  # by parameter name, into this run's layout (rlhf_pipe/optim_state.py)
                role.load_training_state(state[part])
            except CheckpointError as e:
                raise CheckpointError(f"{path / STATE_FILE}: {part}: {e}") from None
        self.prompts.load_state_dict(state["data"])
        if self.ptx:
            if "ptx" in state:
                self.ptx.sampler.load_state_dict(state["ptx"])
            elif len(self.ptx.texts) == 1:  # written before PTX was mixed by ratio
                self.ptx.sampler.load_state_dict({"pos": [state["ptx_pos"]], "pass": [0]})
        self.relay.load_state_dict(state.get("relay", {"episodes": []}))
        self.running.load_state_dict(state["running_rewards"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        return state


class RunFolder:
    """work_dir, claimed when the run first writes to it (learn() or save()): a trainer that
    only runs steps (the bench) leaves it alone, and resume(), called before, tells the claim
    which run this continues."""

    def __init__(self, work_dir: Path, train: TrainConfig, console: bool):
        self.work_dir, self.train, self.console = work_dir, train, console
        self.resumed: tuple[int, Path | None] | None = None  # (step, checkpoint)
        self.run_dir: RunDir | None = None
        self.logger: MetricsLogger | None = None  # opened with the claim

    def claim(self) -> None:
        """Take work_dir for this run, once: refused if it holds another run, unless resume()
        continued that one (then the killed run's lines after the checkpoint go)."""
        if self.run_dir is not None:
            return
        step, checkpoint = self.resumed if self.resumed is not None else (None, None)
        self.run_dir = RunDir(self.work_dir, step, checkpoint)
        t = self.train
        self.logger = MetricsLogger(
            self.work_dir,
            metric_loggers(t),
            self.console,
            t.wandb,
            purge_step=self.run_dir.purge_step,
        )

    def save(self, step: int, actor, critic, tokenizer, state: dict) -> Path:
        self.claim()

        def write(tmp: Path) -> None:
            actor.save(str(tmp / "actor"))
            tokenizer.save_pretrained(tmp / "actor")
            if critic is not None:
                critic.save(str(tmp / "critic"))
                tokenizer.save_pretrained(tmp / "critic")
            torch.save(state, tmp / STATE_FILE)

        return write_checkpoint(self.work_dir, step, write, self.train.keep_last)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if self.run_dir is not None:
            self.run_dir.close()
