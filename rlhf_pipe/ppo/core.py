"""PPO math as small pure tensor functions.

Notation:
    B     samples (rows) in the tensors passed in; may be one micro-batch of a larger batch
    T     response (action) tokens per row; responses are left-aligned, padding on the right
    V     vocabulary size
    mask  (B, T) float or bool, 1 on real response tokens, 0 on padding
    logp  (B, T) log-probability of the sampled token under the current policy
    r     importance ratio exp(logp - old_logp)
    mu    behaviour policy: the engine that sampled the tokens (vLLM), log-probs behaviour_logp
    A     advantages (B, T)
    R     returns (B, T), the value-function targets

Every loss returns an unreduced per-token (B, T) tensor. Reduction happens in ``aggregate`` or
``seq_mean_token_mean`` with a normaliser the caller computes once per optimizer step over the
whole batch, so slicing the batch into micro-batches never changes the gradient.

No function mutates its inputs, calls ``.item()`` or syncs with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_whiten",
    "logprobs_from_logits",
    "entropy_from_logits",
    "kl_penalty",
    "token_rewards",
    "gae_advantages",
    "policy_loss",
    "behaviour_weights",
    "value_loss",
    "aggregate",
    "seq_mean_token_mean",
    "RunningMoments",
    "normalize",
    "ptx_loss",
]


# --------------------------------------------------------------------------- masked reductions


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over entries where ``mask`` is 1.

    x, mask: same shape (or broadcastable). dim None sums everything (0-dim result).
    """
    masked = x * mask.to(x.dtype)
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, eps: float = 1e-8) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1; 0 where the mask is empty.

    The count is clamped to ``eps`` from below, so an all-zero mask yields 0 / eps = 0
    (for a 0/1 mask this is the same as clamping the count to 1).
    """
    count = mask.to(x.dtype)
    count = count.sum() if dim is None else count.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(eps)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and population variance (unbiased=False) over the
    masked entries. With ``shift_mean=False`` the mean is added back (scale only).

    Entries where the mask is 0 are transformed by the same affine map; they carry no meaning.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


# --------------------------------------------------------------------------- log-probs, entropy


def _upcast(logits: Tensor) -> Tensor:
    """float32 view of lower-precision logits; float32/float64 are passed through untouched."""
    return logits.float() if logits.element_size() < 4 else logits


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels], computed as gather(logits) - logsumexp(logits).

    logits: (B, T, V), labels: (B, T) long -> (B, T) in float32 (or float64 for float64 logits).
    Never materialises the full (B, T, V) log-softmax; bf16/fp16 logits are upcast to float32
    for the logsumexp (that upcast copy is the one (B, T, V) temporary).
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return _upcast(picked) - torch.logsumexp(_upcast(logits), dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits): H = logsumexp(z) - sum_v p_v z_v.

    logits: (B, T, V), finite (a -inf logit gives 0 * -inf = NaN) -> (B, T) in float32 (or float64).
    """
    z = _upcast(logits)
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


def ptx_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Per-token negative log-likelihood for the pretraining (ptx) term; 0 on padding.

    logits: (B, T, V), labels: (B, T), mask: (B, T) -> (B, T).
    """
    nll = -logprobs_from_logits(logits, labels)
    return nll * mask.to(nll.dtype)


# --------------------------------------------------------------------------- KL and rewards


def kl_penalty(
    logp: Tensor, ref_logp: Tensor, kind: str = "k1", cap: float | None = 10.0
) -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    With d = logp - ref_logp (see http://joschu.net/blog/kl-approx.html):
        "k1"   d                         unbiased, high variance, can be negative
        "k2"   0.5 * d^2
        "k3"   exp(-d) + d - 1           unbiased, low variance, always >= 0
        "abs"  |d|
    The estimate is clamped to [-cap, cap] (verl and OpenRLHF cap at 10; None: no cap): one
    token far from the reference (k3 at d = -5 is e^5 - 6 = 142) would otherwise dominate the
    reward or the loss. A capped token has zero gradient. For k3, d is first clamped to +-20
    so exp(-d) stays finite in float32 (for a cap below 19 the result is the same).
    logp, ref_logp: (B, T) -> (B, T).
    """
    d = logp - ref_logp
    if kind == "k1":
        kl = d
    elif kind == "k2":
        kl = 0.5 * d.square()
    elif kind == "k3":
        d = d.clamp(-20.0, 20.0) if cap is not None else d
        kl = torch.exp(-d) + d - 1.0
    elif kind == "abs":
        kl = d.abs()
    else:
        raise ValueError(
            f"unknown kl_penalty kind {kind!r}; expected one of 'k1', 'k2', 'k3', 'abs'"
        )
    return kl if cap is None else kl.clamp(-cap, cap)


def _last_valid_index(mask: Tensor) -> Tensor:
    """(B, T) mask -> (B,) long index of the last 1 in each row, -1 for an all-zero row."""
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(-1)


def token_rewards(
    scores: Tensor,
    kl: Tensor,
    mask: Tensor,
    kl_coeff: float,
    clip_min: float | None,
    clip_max: float | None,
) -> Tensor:
    """Per-token reward: -kl_coeff * kl on every valid token, plus the (optionally clipped)
    sequence score on the last valid token of each row. A row with an all-zero mask gets no score.

    scores: (B,), kl: (B, T), mask: (B, T) -> (B, T) in kl's dtype.
    """
    m = mask.to(kl.dtype)
    rewards = -kl_coeff * kl * m  # (B, T)
    score = scores.to(kl.dtype)
    if clip_min is not None or clip_max is not None:
        score = score.clamp(min=clip_min, max=clip_max)
    last = _last_valid_index(mask)  # (B,)
    score = torch.where(last >= 0, score, torch.zeros_like(score))
    index = last.clamp_min(0).unsqueeze(-1)  # (B, 1)
    bonus = torch.zeros_like(rewards).scatter(-1, index, score.unsqueeze(-1))
    return rewards + bonus


# --------------------------------------------------------------------------- advantages


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv:1506.02438).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t

    Rewards and values are masked first, so values past the last valid token count as 0
    (the episode ends with the response) and padding adds nothing. One reverse loop over T,
    vectorised across B.

    rewards, values, mask: (B, T) -> advantages (B, T), returns (B, T); both 0 where mask is 0.
    """
    m = mask.to(values.dtype)
    r = rewards * m
    v = values * m
    B, T = v.shape
    next_value = v.new_zeros(B)
    next_adv = v.new_zeros(B)
    advs = []
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = delta + gamma * lam * next_adv
        next_value = v[:, t]
        advs.append(next_adv)
    advantages = torch.stack(advs[::-1], dim=1) * m  # (B, T)
    returns = (advantages + v) * m
    return advantages, returns


# --------------------------------------------------------------------------- losses


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    dual_clip_c: float | None = None,
    max_log_ratio: float | None = 20.0,
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate per token (Schulman et al. 2017, arXiv:1707.06347).

        loss = max(-A * r, -A * clip(r, 1 - clip_eps, 1 + clip_eps_high))

    ``clip_eps_high`` defaults to ``clip_eps`` (set it higher for DAPO-style "clip higher").
    ``dual_clip_c`` (> 1; None: off) is dual-clip PPO (Ye et al. 2020, arXiv:1912.09729): for
    A < 0 the loss is also bounded above by -A * c, so a ratio far above 1 on a bad action cannot
    give an unbounded loss:  loss = min(loss, -A * c) where A < 0.
    ``max_log_ratio`` clamps logp - old_logp to [-m, m] before the exp (verl's bound, 20; None:
    off): exp(100) is inf in float32, exp(20) = 4.9e8 is not. Clamped tokens get zero gradient.
    logp, old_logp, advantages: (B, T) -> loss (B, T), clipped (B, T) float 0/1, 1 where either
    clip is active (the clipped branch is strictly larger, or the dual-clip bound strictly
    smaller): those tokens get zero gradient.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logp - old_logp
    if max_log_ratio is not None:
        log_ratio = log_ratio.clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped_branch = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    clipped = clipped_branch > unclipped
    loss = torch.where(clipped, clipped_branch, unclipped)
    if dual_clip_c is not None:
        bound = -advantages * dual_clip_c  # > 0 where A < 0
        lower = (advantages < 0) & (bound < loss)
        loss = torch.where(lower, bound, loss)
        clipped = clipped | lower  # disjoint: A < 0 clips above only where r < 1 - eps < c
    return loss, clipped.to(loss.dtype)


def behaviour_weights(
    prox_logp: Tensor,
    behaviour_logp: Tensor,
    cap: float,
    mode: str,
    max_log_ratio: float = 20.0,
) -> tuple[Tensor, Tensor]:
    """Importance weights of the trainer's policy against the policy that sampled the tokens.

        w_raw = pi_prox / mu = exp(prox_logp - behaviour_logp)
        'tis':        w = min(w_raw, cap)                  (truncated IS: verl, TRL token_truncate)
        'decoupled':  w = w_raw where w_raw <= cap, else 0  (AReaL's behav_imp_weight_cap)

    The policy loss per token is multiplied by w, and the PPO ratio stays against prox_logp (the
    Forward stage's recompute, or Train's own detached log-probs where that forward is skipped).
    That is decoupled PPO (Hilton et al. 2021, arXiv:2110.00641; AReaL, arXiv:2505.24298) in
    both modes; they differ in what happens above the cap: truncated to it, or dropped.
    prox_logp, behaviour_logp: (B, T) -> w (B, T) detached, truncated (B, T) float 0/1, 1 where
    w_raw > cap. ``max_log_ratio`` bounds the log-ratio before the exp, as in ``policy_loss``.
    """
    log_w = (prox_logp - behaviour_logp).detach().clamp(-max_log_ratio, max_log_ratio)
    raw = torch.exp(log_w)
    over = raw > cap
    if mode == "tis":
        w = raw.clamp(max=cap)
    elif mode == "decoupled":
        w = torch.where(over, torch.zeros_like(raw), raw)
    else:
        raise ValueError(f"behaviour correction: expected 'tis' or 'decoupled', got {mode!r}")
    return w, over.to(raw.dtype)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_eps: float | None
) -> tuple[Tensor, Tensor]:
    """Clipped value loss per token:

        loss = 0.5 * max((v - R)^2, (old_v + clamp(v - old_v, -eps, eps) - R)^2)

    With ``clip_eps`` None: 0.5 * (v - R)^2 and ``clipped`` all zero.
    values, old_values, returns: (B, T) -> loss (B, T), clipped (B, T) float 0/1.
    """
    unclipped = (values - returns).square()
    if clip_eps is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped)
    v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    clipped_sq = (v_clip - returns).square()
    clipped = clipped_sq > unclipped
    loss = 0.5 * torch.where(clipped, clipped_sq, unclipped)
    return loss, clipped.to(loss.dtype)


# --------------------------------------------------------------------------- reductions


def aggregate(per_token: Tensor, mask: Tensor, normalizer: float | Tensor) -> Tensor:
    """sum(per_token * mask) / normalizer -> 0-dim.

    ``normalizer`` (e.g. the valid-token count of the WHOLE optimizer-step batch) is computed
    once by the caller, so summing this over micro-batches equals the full-batch value.
    """
    return masked_sum(per_token, mask) / normalizer


def seq_mean_token_mean(per_token: Tensor, mask: Tensor, num_samples: float | Tensor) -> Tensor:
    """sum over rows of (row token-mean) / num_samples -> 0-dim.

    ``num_samples`` is the sample count of the WHOLE optimizer-step batch; rows with no valid
    token contribute 0.
    """
    return masked_mean(per_token, mask, dim=-1).sum() / num_samples


# --------------------------------------------------------------------------- running moments


class RunningMoments:
    """Running mean and population std (unbiased=False) of every value seen so far.

    Merges each chunk with Chan et al.'s parallel update, so the result equals the moments of
    the concatenation of all chunks. State is three float64 0-dim tensors that live on the
    device of the last update; nothing is read back to the host.
    Before any update (count 0): mean 0, std 1, so ``normalize`` is the identity.
    """

    def __init__(self) -> None:
        self._mean = torch.zeros((), dtype=torch.float64)
        self._m2 = torch.zeros((), dtype=torch.float64)  # sum of squared deviations
        self._count = torch.zeros((), dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        """Fold every element of ``x`` (any shape) into the moments."""
        n_b = x.numel()
        if n_b == 0:
            return
        xb = x.detach().to(torch.float64).flatten()
        mean_b = xb.mean()
        m2_b = (xb - mean_b).square().sum()
        mean_a, m2_a, n_a = (s.to(xb.device) for s in (self._mean, self._m2, self._count))
        n = n_a + n_b
        delta = mean_b - mean_a
        self._mean = mean_a + delta * (n_b / n)
        self._m2 = m2_a + m2_b + delta.square() * (n_a * n_b / n)
        self._count = n

    @property
    def mean(self) -> Tensor:
        return self._mean

    @property
    def std(self) -> Tensor:
        var = self._m2 / self._count.clamp_min(1.0)
        return torch.where(self._count > 0, var.sqrt(), torch.ones_like(var))

    @property
    def count(self) -> Tensor:
        return self._count.to(torch.int64)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self._mean.clone(), "m2": self._m2.clone(), "count": self._count.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._mean = torch.as_tensor(state["mean"], dtype=torch.float64).clone()
        self._m2 = torch.as_tensor(state["m2"], dtype=torch.float64).clone()
        self._count = torch.as_tensor(state["count"], dtype=torch.float64).clone()


def normalize(x: Tensor, mean: Tensor | float, std: Tensor | float, eps: float = 1e-8) -> Tensor:
    """(x - mean) / (std + eps), computed in x's dtype and on x's device."""
    mean = torch.as_tensor(mean).to(x)
    std = torch.as_tensor(std).to(x)
    return (x - mean) / (std + eps)
