"""roles.py's small pure parts: the gradient divisor, the warmup schedule, the loss reduction
and the packing choice (the roles themselves run in tests/pipeline and tests/distributed)."""

import pytest
import torch
from torch import nn

from rlhf_pipe.roles import _loss, choose_packing, grad_divisor, warmup_schedule


def test_grad_divisor_is_the_token_count_only_for_token_mean():
    assert grad_divisor("token_mean", 7) == 7.0
    assert grad_divisor("seq_mean_token_mean", 7) == 1.0


def test_warmup_schedule_ramps_linearly_then_holds():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_loss_reductions():
    per_token = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # token_mean here sums (the divisor is applied to the gradient later): 1 + 3 + 2
    assert _loss(per_token, mask, "token_mean", 2).item() == pytest.approx(6.0)
    # per-sample means 2 and 2, over 2 samples
    assert _loss(per_token, mask, "seq_mean_token_mean", 2).item() == pytest.approx(2.0)


def test_packing_off_is_off_for_any_model():
    assert choose_packing(nn.Linear(1, 1), False, "actor") is False
