"""Log-probs and entropy of the sampled tokens straight from hidden states, in row chunks.

Notation:
    N   rows (response tokens, padding included) of the flattened batch
    H   hidden size
    V   vocabulary size
    h   (N, H) final hidden states (after the last norm), in the model's dtype
    W   (V, H) output-embedding (LM head) weight, b its optional (V,) bias
    y   (N,) long, the token each row predicts

The plain path, ``logprobs_from_logits(h @ W.T + b, y)``, holds the (N, V) logits, their float32
upcast and, for the backward pass, the softmax: at a 151936-word vocabulary that is several GB
per train chunk. Here each chunk of ``chunk_rows`` rows computes its logits, reduces them to
(log-prob, entropy, logsumexp) and drops them; the backward pass recomputes the chunk's logits
from ``h`` and ``W`` (one more head matmul) instead of keeping them.

The values equal the plain path's up to the head matmul's rounding in the model's dtype: each
chunk's logits are the same bf16/fp16 products, upcast to float32 exactly as
``logprobs_from_logits`` and ``entropy_from_logits`` do. Entropy is a metric here: it carries no
gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["linear_logprobs"]


def _upcast(z: Tensor) -> Tensor:
    return z.float() if z.element_size() < 4 else z


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_rows: int, with_entropy: bool):
        n = hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            z = _upcast(F.linear(hidden[start:end], weight, bias))  # (n_c, V)
            lse[start:end] = torch.logsumexp(z, dim=-1)
            logp[start:end] = z.gather(-1, labels[start:end, None]).squeeze(-1) - lse[start:end]
            if with_entropy:
                p = torch.softmax(z, dim=-1)
                entropy[start:end] = lse[start:end] - (p * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulated over chunks in float32: one bf16 sum per chunk would round at each add.
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = (
            torch.zeros(bias.shape, dtype=acc, device=bias.device)
            if need_b and bias is not None
            else None
        )
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, hidden.shape[0])
            h = hidden[start:end]
            z = _upcast(F.linear(h, weight, bias))
            # d logp / d z = onehot(y) - softmax(z)
            grad_z = -torch.exp(z - lse[start:end, None])
            grad_z.scatter_add_(-1, labels[start:end, None], torch.ones_like(grad_z[:, :1]))
            grad_z = (grad_z * grad_logp[start:end, None]).to(weight.dtype)  # (n_c, V)
            if grad_h is not None:
                grad_h[start:end] = grad_z @ weight
            if grad_w is not None:
                grad_w += (grad_z.t() @ h).to(acc)
            if grad_b is not None:
                grad_b += grad_z.sum(0).to(acc)
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
        )


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_rows: int,
    bias: Tensor | None = None,
    with_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(h @ W.T + b)[y] and the entropy of that softmax, ``chunk_rows`` rows at a time.

    hidden (N, H), weight (V, H), labels (N,) -> (logp (N,), entropy (N,) or None), float32
    (float64 for float64 inputs). Gradients flow to ``hidden``, ``weight`` and ``bias`` through
    ``logp`` only.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    logp, entropy = _LinearLogprobs.apply(hidden, weight, bias, labels, chunk_rows, with_entropy)
    return logp, (entropy if with_entropy else None)
