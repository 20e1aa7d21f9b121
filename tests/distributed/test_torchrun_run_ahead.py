"""Run-ahead (max_staleness=1) under torchrun, gloo, one rank per role: the same weights as
the one-process run with the same staleness."""

import pytest
import torch

from tests.distributed.test_torchrun import _single_process, _torchrun, _weights

pytestmark = pytest.mark.slow


def test_torchrun_run_ahead_equals_single_process(tmp_path, vllm_engine, initial_policy_weights):
    proc = _torchrun(4, tmp_path / "dist", 3, ("train_config.max_staleness=1",))
    assert proc.returncode == 0, "\n".join(
        line for line in proc.stderr.splitlines() if "error" in line.lower()
    )[-3000:]
    assert "trained to step 3" in proc.stdout
    over = {"train_config.max_staleness": 1}
    single = _single_process(tmp_path / "single", vllm_engine, initial_policy_weights, 3, **over)
    dist_ckpt = tmp_path / "dist" / "checkpoints" / "step_000003"
    for part in ("actor", "critic"):
        a, b = _weights(dist_ckpt / part), _weights(single / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
