"""optim_state.py: an AdamW state saved by parameter name loads into a fresh optimizer and
steps on exactly as the original would."""

import pytest
import torch
from torch import nn

from rlhf_pipe import optim_state
from rlhf_pipe.checkpoint import CheckpointError
from rlhf_pipe.roles import warmup_schedule


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, warmup_schedule(opt, 2)


def _step(model, opt, sched):
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_plain_state_round_trips_and_steps_on_identically():
    model, opt, sched = _model_and_opt()
    _step(model, opt, sched)
    state = optim_state.plain_state(model, opt, sched)
    assert optim_state.is_universal(state)
    assert set(state["params"]) == {"weight", "bias"}
    assert optim_state.common_step(state) == 1.0

    other, other_opt, other_sched = _model_and_opt(seed=1)  # other weights, no moments
    optim_state.load_plain(other, other_opt, other_sched, state)
    assert torch.equal(other.weight, model.weight)
    _step(model, opt, sched)
    _step(other, other_opt, other_sched)
    assert torch.equal(other.weight, model.weight)
    assert other_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_a_state_of_other_parameters_is_refused():
    model, opt, sched = _model_and_opt()
    state = optim_state.plain_state(model, opt, sched)
    state["params"]["extra"] = state["params"].pop("bias")
    with pytest.raises(CheckpointError, match=r"missing \['bias'\], unexpected \['extra'\]"):
        optim_state.check_names(state, optim_state.trained_names(model))


def test_common_step_is_none_before_a_step_and_refuses_mixed_steps():
    model, opt, sched = _model_and_opt()
    assert optim_state.common_step(optim_state.plain_state(model, opt, sched)) is None
    _step(model, opt, sched)
    state = optim_state.plain_state(model, opt, sched)
    state["params"]["bias"]["step"] = 2.0
    with pytest.raises(CheckpointError, match="different Adam steps"):
        optim_state.common_step(state)


def test_one_saved_lr_fills_every_group():
    model, opt, _ = _model_and_opt()
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    optim_state.set_lrs(opt, {"lr": [0.5]})
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
