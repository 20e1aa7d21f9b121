"""Critic-free advantages from groups of answers to the same prompt (GRPO, RLOO, REINFORCE++).

Notation:
    B          samples; n answers were sampled per prompt, so B = num_prompts * n
    T          response tokens per row (left-aligned, padding on the right)
    group_ids  (B,) long, the prompt each sample belongs to; any integer ids, any order
    scores     (B,) scalar reward of each sample
    mask       (B, T) float or bool, 1 on real response tokens

Whole groups only: every member of a group must be in the same call. A group split across two
calls (e.g. across two micro-batches) gets a different baseline in each half, which is wrong,
and these functions cannot detect it. The caller waits until all n answers of a prompt are
scored before computing advantages.

Groups are handled with ``torch.unique`` and ``index_add`` (no Python loop over groups).
``torch.unique`` is a host sync on GPU (its output size depends on the data); it runs once per
batch on a (B,) tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_pipe.ppo.core import masked_whiten

__all__ = [
    "grpo_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "broadcast_to_tokens",
]


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """(B,) ids -> (B,) dense group index in [0, G), and G."""
    # sync point on GPU (data-dependent output size), see the module docstring
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, uniq.numel()


def _group_sum(x: Tensor, inverse: Tensor, G: int) -> Tensor:
    """(B,) -> (B,): the sum of x over each sample's group."""
    return x.new_zeros(G).index_add(0, inverse, x)[inverse]


def _group_constant(x: Tensor, inverse: Tensor, G: int) -> Tensor:
    """(B,) -> (B,) bool: every member of the sample's group has the same value of x."""
    empty = x.new_zeros(G)
    hi = empty.scatter_reduce(0, inverse, x, "amax", include_self=False)
    lo = empty.scatter_reduce(0, inverse, x, "amin", include_self=False)
    return (hi == lo)[inverse]


def grpo_advantages(
    scores: Tensor,
    group_ids: Tensor,
    eps: float = 1e-6,
    scale_by_std: bool = True,
    unbiased: bool = True,
) -> Tensor:
    """GRPO (Shao et al. 2024, arXiv:2402.03300): (r - group mean) / (group std + eps).

    The std is the sample std, sum of squares / (n - 1), as in verl, TRL and OpenRLHF; with
    ``unbiased=False`` it is the population std, / n (advantages sqrt(n / (n - 1)) larger).
    A group of one has advantage 0 either way (r - mean = 0; its (n - 1) = 0 is taken as 1,
    so no NaN). ``scale_by_std=False`` gives r - group mean (Dr. GRPO, arXiv:2503.20783).
    A group whose scores are all equal gets exactly 0 (not a rounding residue / eps).
    scores, group_ids: (B,) -> (B,).
    """
    inverse, G = _group_index(group_ids)
    size = _group_sum(torch.ones_like(scores), inverse, G)
    adv = scores - _group_sum(scores, inverse, G) / size
    if scale_by_std:
        dof = (size - 1).clamp_min(1) if unbiased else size
        std = (_group_sum(adv.square(), inverse, G) / dof).sqrt()
        adv = adv / (std + eps)
    return torch.where(_group_constant(scores, inverse, G), torch.zeros_like(adv), adv)


def rloo_advantages(scores: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv:2402.14740):
    r_i - mean of the other members of i's group. A group of size 1 (no baseline) gets 0, and so
    does a group whose scores are all equal.
    scores, group_ids: (B,) -> (B,).
    """
    inverse, G = _group_index(group_ids)
    size = _group_sum(torch.ones_like(scores), inverse, G)
    baseline = (_group_sum(scores, inverse, G) - scores) / (size - 1).clamp_min(1)
    adv = scores - baseline
    zero = _group_constant(scores, inverse, G) | (size < 2)
    return torch.where(zero, torch.zeros_like(adv), adv)


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): discounted return-to-go per token,
        G_t = r_t + gamma * G_{t+1},
    then whitened (mean 0, population std 1) over all valid tokens of the batch passed in.
    Because of that global normalisation the whole batch must be in one call.
    token_rewards, mask: (B, T) -> (B, T), 0 where mask is 0.
    """
    m = mask.to(token_rewards.dtype)
    r = token_rewards * m
    running = r.new_zeros(r.shape[0])
    to_go = []
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        to_go.append(running)
    returns = torch.stack(to_go[::-1], dim=1)  # (B, T)
    return masked_whiten(returns, m) * m


def broadcast_to_tokens(adv: Tensor, mask: Tensor) -> Tensor:
    """Sequence-level advantage on every valid token: (B,), (B, T) -> (B, T), 0 on padding."""
    return adv.unsqueeze(-1) * mask.to(adv.dtype)
