"""torchrun on 2 GPUs: the tiny config with the actor's weights reaching vLLM over NCCL gives the
same run as through gloo and host memory (generation depends on the synced weights, so a wrong
or missing sync changes the sampled answers and their rewards)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TINY_CONFIG

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs"),
]


# Actor, critic and reference in one process on GPU 1 (placement_config.colocate_actor_critic).
ONE_PROCESS = {
    "placement_config.colocate_actor_critic": True,
    "placement_config.colocate_actor_ref": True,
    "placement_config.local_rank_gpus": "[0,1]",
}


def _run(tmp_path, backend, name=None, nproc=4, **layout):
    work = tmp_path / (name or backend)
    sets = {
        "train_config.work_dir": str(work),
        "train_config.max_train_step": 4,
        "train_config.progress_bar": False,
        "train_config.tensorboard": False,
        "train_config.weight_sync_backend": backend,
        "placement_config.local_rank_gpus": "[0,1,1,1]",
        "model_configs.policy.trainer_config.lr": 1e-3,
        **layout,
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(29600 + os.getpid() % 300),
        "-m",
        "rlhf_pipe.train",
        str(TINY_CONFIG),
    ]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"weight sync: {backend}" in proc.stderr
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return rows


def test_nccl_sync_run_equals_gloo_run(tmp_path):
    nccl, gloo = _run(tmp_path, "nccl"), _run(tmp_path, "gloo")
    for a, b in zip(nccl, gloo):
        print(
            f"step {a['step']}: reward {a['reward']:.6f} / {b['reward']:.6f}, sync "
            f"{a['sync/seconds'] * 1e3:.2f} ms nccl / {b['sync/seconds'] * 1e3:.2f} ms gloo"
        )
    assert [r["reward"] for r in nccl] == pytest.approx([r["reward"] for r in gloo], abs=1e-6)
    assert [r["response_len"] for r in nccl] == [r["response_len"] for r in gloo]


def test_one_process_for_three_models_equals_a_process_each(tmp_path):
    """The same run, with the three models' calls taking turns in one process on GPU 1."""
    apart = _run(tmp_path, "nccl")
    together = _run(tmp_path, "nccl", "one_process", nproc=2, **ONE_PROCESS)
    for a, b in zip(together, apart):
        print(
            f"step {a['step']}: reward {a['reward']:.6f} / {b['reward']:.6f}, step "
            f"{a['step_s']:.2f} s one process / {b['step_s']:.2f} s a process each"
        )
    assert [r["reward"] for r in together] == pytest.approx([r["reward"] for r in apart], abs=1e-6)
