"""A trained role's optimizer state by parameter name, independent of its layout.

Saved by plain AdamW roles (rlhf_pipe.roles) and ZeRO-2/3 roles (rlhf_pipe.zero) alike, and
loaded into either, on any data-parallel size:

    {"format": "universal", "layout": "plain" | "ZeRO-2 over 2 ranks" | ...,
     "params": {name: {"fp32": full fp32 master weight,
                       "exp_avg", "exp_avg_sq": full fp32 Adam moments (absent before a step),
                       "step": Adam's step count (float)}},
     "lr": [lr of each param group], "scheduler": the LR scheduler's state_dict}

The fp32 weights matter under bf16, where the model's weights (the HF folder) are rounded
copies of ZeRO's masters. Import-light: torch only.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_pipe.checkpoint import CheckpointError

FORMAT = "universal"
MOMENTS = ("exp_avg", "exp_avg_sq")


def is_universal(state: dict) -> bool:
    return state.get("format") == FORMAT


def trained_names(model: nn.Module) -> list[str]:
    """Names of the parameters an optimizer steps, in the model's (every rank's) order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def check_names(state: dict, names: list[str]) -> None:
    saved = set(state["params"])
    missing, unexpected = sorted(set(names) - saved), sorted(saved - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"optimizer state ({state['layout']}) does not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def common_step(state: dict) -> float | None:
    """The one Adam step count of a ZeRO flat partition (None: never stepped). Plain AdamW
    keeps one per parameter; they are equal unless a parameter went without gradients."""
    steps = {e["step"] for e in state["params"].values() if "exp_avg" in e}
    if len(steps) > 1:
        raise CheckpointError(
            f"optimizer state ({state['layout']}): parameters at different "
            f"Adam steps {sorted(steps)[:3]}; ZeRO keeps one step per partition"
        )
    return steps.pop() if steps else None


def plain_state(model: nn.Module, optimizer, scheduler) -> dict:
    """A torch optimizer's state by name (same on every data-parallel rank)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    params = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            entry = {"fp32": _host(p)}
            if "exp_avg" in st:
                entry.update({k: _host(st[k]) for k in MOMENTS}, step=float(st["step"]))
            params[name_of[id(p)]] = entry
    return {
        "format": FORMAT,
        "layout": "plain",
        "params": params,
        "lr": [g["lr"] for g in optimizer.param_groups],
        "scheduler": scheduler.state_dict(),
    }


def load_plain(model: nn.Module, optimizer, scheduler, state: dict) -> None:
    """Universal state into a torch AdamW over `model`'s trained parameters."""
    check_names(state, trained_names(model))
    name_of = {id(p): n for n, p in model.named_parameters()}
    target = optimizer.state_dict()  # param_groups with parameter indices, in optimizer order
    order = [p for g in optimizer.param_groups for p in g["params"]]
    target["state"] = {}
    for i, p in enumerate(order):
        entry = state["params"][name_of[id(p)]]
        with torch.no_grad():  # the master weight: exact under bf16 models too
            p.copy_(entry["fp32"].to(p.dtype))
        if "exp_avg" in entry:  # load_state_dict casts the moments to the parameter's dtype
            target["state"][i] = {
                "step": torch.tensor(entry["step"], dtype=torch.float32),
                **{k: entry[k] for k in MOMENTS},
            }
    for group, lr in zip(target["param_groups"], _lrs(state, len(target["param_groups"]))):
        group["lr"] = lr
    optimizer.load_state_dict(target)
    scheduler.load_state_dict(state["scheduler"])


def _host(t: torch.Tensor) -> torch.Tensor:
    # A copy: the live tensor keeps training. On the host: any machine can load it.
    return t.detach().to("cpu", torch.float32, copy=True)


def set_lrs(optimizer, state: dict) -> None:
    for group, lr in zip(optimizer.param_groups, _lrs(state, len(optimizer.param_groups))):
        group["lr"] = lr


def _lrs(state: dict, n: int) -> list[float]:
    lrs = state["lr"]
    return lrs if len(lrs) == n else [lrs[0]] * n  # one group per role in rlhf_pipe
