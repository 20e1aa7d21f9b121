"""Checkpoints: exact resume on CPU, atomic writes, keep_last, a full disk."""

import errno

import pytest
import torch

from rlhf_pipe.checkpoint import (
    MARKER,
    CheckpointError,
    complete_checkpoints,
    resolve_resume,
    write_checkpoint,
)
from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import tiny_config


@pytest.mark.slow
def test_resume_continues_bit_for_bit(tmp_path, vllm_engine, initial_policy_weights):
    over = {"train_config.save_interval": 1, "repeater_config.norm_rewards": "running"}
    vllm_engine.load_weights(initial_policy_weights.items(), version=0)
    straight = RLHFTrainer(tiny_config(tmp_path / "a", **over), engine=vllm_engine, console=False)
    full = straight.learn(4)
    final = {k: v.clone() for k, v in straight.actor.model.state_dict().items()}
    straight.close()
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step_000001"
    assert (ckpt / MARKER).exists()

    vllm_engine.load_weights(initial_policy_weights.items(), version=0)  # a fresh engine state
    resumed = RLHFTrainer(tiny_config(tmp_path / "b", **over), engine=vllm_engine, console=False)
    resumed.resume(ckpt)
    assert (resumed.step_index, resumed.version) == (1, 1)
    rest = resumed.learn(4)
    resumed.close()
    assert len(rest) == 3
    for a, b in zip(full[1:], rest):
        assert a["reward"] == b["reward"] and a["kl"] == b["kl"]
        assert a["actor/policy_loss"] == b["actor/policy_loss"]
    state = resumed.actor.model.state_dict()
    assert all(torch.equal(final[k], state[k]) for k in final)


def test_atomic_write_keep_last_and_auto(tmp_path):
    def write(tmp):
        tmp.mkdir(parents=True)
        (tmp / "w.bin").write_bytes(b"x")

    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, write, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert resolve_resume("auto", tmp_path).name == "step_000003"

    def killed(tmp):  # dies half way: the previous checkpoint stays the newest complete one
        write(tmp)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 4, killed)
    assert resolve_resume("auto", tmp_path).name == "step_000003"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints" / "step_000004.tmp"), tmp_path)
    assert resolve_resume("auto", tmp_path / "empty") is None


def test_full_disk_keeps_the_older_checkpoint(tmp_path):
    def ok(tmp):
        tmp.mkdir(parents=True)

    def full(tmp):
        tmp.mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    write_checkpoint(tmp_path, 1, ok)
    with pytest.raises(CheckpointError) as err:
        write_checkpoint(tmp_path, 2, full)
    assert str(err.value) == (
        f"checkpoint {tmp_path}/checkpoints/step_000002: no space left on "
        f"device; kept {tmp_path}/checkpoints/step_000001"
    )
    assert not (tmp_path / "checkpoints" / "step_000002.tmp").exists()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000001"]


def test_export_gives_a_loadable_hf_folder(tmp_path, tiny_assets):
    import shutil

    from rlhf_pipe.checkpoint import export_checkpoint
    from rlhf_pipe.cli import main

    ckpt = tmp_path / "checkpoints" / "step_000001"
    shutil.copytree(tiny_assets.policy, ckpt / "actor")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        export_checkpoint(ckpt, tmp_path / "out")
    (ckpt / MARKER).write_text("1\n")
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    AutoTokenizer.from_pretrained(tmp_path / "out")
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 2  # not empty: refused
    assert main(["export", str(ckpt), str(tmp_path / "c"), "--part", "critic"]) == 2


_KILLED_WRITER = """
import sys, time
from pathlib import Path
import torch
from rlhf_pipe.checkpoint import write_checkpoint
from rlhf_pipe.models import load_causal_lm, save_hf

work, policy = sys.argv[1], sys.argv[2]
model = load_causal_lm(policy)

def whole(tmp):
    save_hf(model, str(tmp / "actor"))
    torch.save({"step": 1}, tmp / "trainer_state.pt")

def dies_half_way(tmp):
    save_hf(model, str(tmp / "actor"))
    print("written", flush=True)
    time.sleep(60)  # SIGKILLed here, before the state file and the marker

write_checkpoint(work, 1, whole)
write_checkpoint(work, 2, dies_half_way)
"""


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one_loadable(tmp_path, tiny_assets):
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from rlhf_pipe.models import load_causal_lm
    from rlhf_pipe.roles import PolicyRole
    from tests.conftest import ROOT

    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path), str(tiny_assets.policy)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "written"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoints" / "step_000002.tmp" / "actor").is_dir()  # the torn write
    found = resolve_resume("auto", tmp_path)
    assert found.name == "step_000001"
    role = PolicyRole(
        load_causal_lm(str(tiny_assets.policy)),
        0,
        lr=1e-6,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        max_grad_norm=1.0,
        infer_micro_bs=1,
        train_micro_bs=1,
    )
    role.load_weights_from(str(found / "actor"))  # strict: every weight is there
    assert torch.load(found / "trainer_state.pt")["step"] == 1
    assert load_file(str(found / "actor" / "model.safetensors")).keys()
