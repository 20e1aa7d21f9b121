"""Samples as they travel through the stages, and padding them into model batches.

A `Sample` keeps its own unpadded tensors, so any stage can regroup samples (forward chunks,
train chunks, PPO mini-batches) and padding depends only on the chunk, never on how the
pipeline happened to slice the step. That is what makes pipelined == serial.

A chunk becomes either a `PaddedBatch` (rows padded to the chunk's widest prompt and answer)
or a `PackedBatch` (the samples back to back in one row, no padding; see `collate`). Both give
per-token results in the same (b, R) layout through `labels` and `rows`, so the losses never
know which one ran.

Notation: b = samples in a chunk, P = padded prompt width, R = padded response width,
P_i / R_i = one sample's own lengths, T = sum of P_i + R_i, N = sum of R_i.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Sample:
    sample_id: int
    prompt_index: int
    version: int  # policy version that generated the response
    prompt_ids: Tensor  # (P_i,) long
    response_ids: Tensor  # (R_i,) long
    prompt_text: str = ""
    response_text: str = ""
    finish_reason: str | None = None
    relay_from: int | None = None  # replayed: the episode (step) that generated it
    # (R_i,) float: the generating engine's log-probs of the response tokens (vLLM's own);
    # None from the hf backend, beam search and replayed samples (no correction for those)
    behaviour_logp: Tensor | None = None
    # Forward stage
    old_logp: Tensor | None = None  # (R_i,) actor log-probs at generation weights
    ref_logp: Tensor | None = None  # (R_i,)
    values: Tensor | None = None  # (R_i,) critic values
    score: Tensor | None = None  # () reward before clipping / normalisation
    score_parts: Tensor | None = None  # (K,) each reward scorer's own score, before weights
    prompt_logprobs: list | None = None  # rollout prompt_logprobs: per prompt token, or None
    # Advantage stage
    kl: Tensor | None = None  # (R_i,)
    token_rewards: Tensor | None = None  # (R_i,)
    advantages: Tensor | None = None  # (R_i,)
    returns: Tensor | None = None  # (R_i,)
    shaped_score: Tensor | None = None  # () grpo/rloo: clipped, 'batch'-normed, minus KL-in-reward

    @property
    def num_actions(self) -> int:
        return int(self.response_ids.numel())


@dataclass
class MicroBatch:
    """PIPE micro-batch: `index` counts in completion order within a step."""

    index: int
    samples: list[Sample]
    meta: dict = field(default_factory=dict)


@dataclass
class PaddedBatch:
    input_ids: Tensor  # (b, P+R) prompt left-padded, response right-padded
    attention_mask: Tensor  # (b, P+R)
    position_ids: Tensor  # (b, P+R)
    response_mask: Tensor  # (b, R) float, 1 on real response tokens
    prompt_width: int  # P
    last_index: Tensor  # (b,) position of each row's last real token

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    @property
    def labels(self) -> Tensor:
        """(b, R) the response tokens, padding where a row's answer is shorter."""
        return self.input_ids[:, self.prompt_width :]

    def rows(self, per_token: Tensor) -> Tensor:
        """Per-token results, computed in this batch's layout, as (b, R)."""
        return per_token

    def to(self, device) -> PaddedBatch:
        return PaddedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.response_mask.to(device),
            self.prompt_width,
            self.last_index.to(device),
        )


@dataclass
class PackedBatch:
    """A chunk's samples back to back in one row, without padding.

    position_ids restart at 0 with each sample; with no attention mask, transformers reads
    that as packed sequences and attends only within each sample (see
    `rlhf_pipe.models.packing_supported`). Model outputs are taken only at the N positions
    that predict response tokens, in sample order, and `rows` scatters them into (b, R).
    """

    input_ids: Tensor  # (1, T)
    position_ids: Tensor  # (1, T)
    response_mask: Tensor  # (b, R) float, 1 on real response tokens
    predict_index: Tensor  # (N,) position in the row whose output predicts each response token
    token_row: Tensor  # (N,) which sample each response token belongs to
    token_col: Tensor  # (N,) its place within that sample's answer
    last_index: Tensor  # (b,) position of each sample's last real token
    attention_mask = None  # packed: the position ids carry the sample boundaries

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    @property
    def labels(self) -> Tensor:
        """(N,) the response tokens, sample after sample."""
        return self.input_ids[0, self.predict_index + 1]

    def rows(self, per_token: Tensor) -> Tensor:
        """(N,) per-token results -> (b, R), zero past each answer's end (differentiable)."""
        out = per_token.new_zeros(self.response_mask.shape)
        return out.index_put((self.token_row, self.token_col), per_token)

    def to(self, device) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.response_mask.to(device),
            self.predict_index.to(device),
            self.token_row.to(device),
            self.token_col.to(device),
            self.last_index.to(device),
        )


def collate(samples: list[Sample], pad_id: int, packed: bool = False) -> PaddedBatch | PackedBatch:
    """One model batch of `samples`: packed into one row, or padded (prompts on the left)."""
    if packed:
        return _pack(samples)
    return _pad(samples, pad_id)


def _pack(samples: list[Sample]) -> PackedBatch:
    ids, positions, predict, token_row, token_col, last = [], [], [], [], [], []
    start = 0
    for i, s in enumerate(samples):
        p, r = int(s.prompt_ids.numel()), s.num_actions
        ids += [s.prompt_ids, s.response_ids]
        positions.append(torch.arange(p + r))
        predict.append(torch.arange(start + p - 1, start + p - 1 + r))
        token_row.append(torch.full((r,), i, dtype=torch.long))
        token_col.append(torch.arange(r))
        last.append(start + p + r - 1)
        start += p + r
    R = max(max(s.num_actions for s in samples), 1)
    response_mask = torch.zeros((len(samples), R), dtype=torch.float32)
    for i, s in enumerate(samples):
        response_mask[i, : s.num_actions] = 1
    return PackedBatch(
        torch.cat(ids).long().unsqueeze(0),
        torch.cat(positions).unsqueeze(0),
        response_mask,
        torch.cat(predict),
        torch.cat(token_row),
        torch.cat(token_col),
        torch.tensor(last, dtype=torch.long),
    )


def _pad(samples: list[Sample], pad_id: int) -> PaddedBatch:
    P = max(int(s.prompt_ids.numel()) for s in samples)
    R = max(max(s.num_actions for s in samples), 1)
    b = len(samples)
    input_ids = torch.full((b, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, P + R), dtype=torch.long)
    response_mask = torch.zeros((b, R), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = int(s.prompt_ids.numel()), s.num_actions
        input_ids[i, P - p : P] = s.prompt_ids
        input_ids[i, P : P + r] = s.response_ids
        attention_mask[i, P - p : P + r] = 1
        response_mask[i, :r] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    # With an empty answer the last real token is the prompt's last token (index P - 1).
    last_index = P - 1 + response_mask.sum(-1).long()
    return PaddedBatch(input_ids, attention_mask, position_ids, response_mask, P, last_index)


def pad_field(samples: list[Sample], name: str, width: int) -> Tensor:
    """Stack a per-token field of `samples` into (b, width), zero padded on the right."""
    out = torch.zeros((len(samples), width), dtype=torch.float32)
    for i, s in enumerate(samples):
        value = getattr(s, name)
        out[i, : value.numel()] = value
    return out


def unpad_into(samples: list[Sample], name: str, padded: Tensor) -> None:
    """Inverse of pad_field: store row i's first R_i entries on samples[i].`name`."""
    padded = padded.detach().float().cpu()
    for i, s in enumerate(samples):
        setattr(s, name, padded[i, : s.num_actions].clone())


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
