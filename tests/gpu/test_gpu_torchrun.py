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


def test_nccl_sync_with_run_ahead_equals_gloo_run_ahead(tmp_path):
    """max_staleness=1: the actor's rank keeps each step's weights on its GPU and broadcasts
    them over NCCL between two generates, while it trains the next step; through gloo the
    same weights go by the controller's host memory. Same bytes, so the same run: the rewards
    to the last digit, the final weights within bf16's tolerance (GPU kernels may sum in
    another order from run to run)."""
    from safetensors.torch import load_file

    stale = {"train_config.max_staleness": 1}
    nccl = _run(tmp_path, "nccl", "nccl_s1", **stale)
    gloo = _run(tmp_path, "gloo", "gloo_s1", **stale)
    for a, b in zip(nccl, gloo):
        print(
            f"s=1 step {a['step']}: reward {a['reward']:.6f} / {b['reward']:.6f}, engine load "
            f"{a.get('sync/bytes', 0) / 1e6:.1f} MB at {a.get('sync/gbps', 0):.2f} GB/s nccl"
        )
    assert [r["reward"] for r in nccl] == pytest.approx([r["reward"] for r in gloo], abs=1e-6)
    assert [r["response_len"] for r in nccl] == [r["response_len"] for r in gloo]
    n = nccl[0]["samples"]
    assert [r.get("staleness/1", 0) for r in nccl] == [0] + [n] * (len(nccl) - 1)
    assert nccl[2]["sync/bytes"] > 0  # step 2 was generated from W(0), broadcast over NCCL

    def actor(name):
        folder = tmp_path / name / "checkpoints" / f"step_{len(nccl):06d}" / "actor"
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = actor("nccl_s1"), actor("gloo_s1")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1.6e-2, atol=1e-5)
