"""What generation produces and what it is asked for, independent of the backend."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    use_beam_search: bool = False
    beam_width: int | None = None  # None: n
    # None: answers stop at max_new_tokens (new_token_limit=True). Else the whole sequence
    # stops here: an answer may take max_seq_len - prompt length tokens (ChatLearn's
    # new_token_limit=False with seq_length).
    max_seq_len: int | None = None
    prompt_logprobs: int | None = None  # k: record prompt-token log-probs (and top k)
    length_range: tuple[int, int] | None = None  # per-request lengths drawn from the seed
    # vLLM: return each sampled token's log-prob (Completion.behaviour_logprobs). The hf
    # backend and beam search have none (config.py refuses a behaviour correction there).
    behaviour_logprobs: bool = True
    # vLLM: sample each request from its own seed (rollout_config.request_seeds); False: from
    # the engine's generator. The hf backend always seeds.
    request_seeds: bool = True

    def max_tokens(self, prompt_len: int) -> int:
        """The answer-length cap of one request."""
        if self.max_seq_len is None:
            return self.max_new_tokens
        return self.max_seq_len - prompt_len


def drawn_length(length_range: tuple[int, int], seed: int) -> int:
    """A request's answer length in [lo, hi], a pure function of its seed (so every
    PIPE_MICRO_BATCH_NUM and every backend sees the same workload)."""
    lo, hi = length_range
    return lo + (seed * 2654435761 % 2**32) % (hi - lo + 1)


@dataclass
class Completion:
    """One finished answer. `sample_id` = prompt_index * n + k is unique within a step."""

    sample_id: int
    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str | None
    version: int  # policy version of the weights that generated it
    engine: int = 0
    extra: dict = field(default_factory=dict)
    # With prompt_logprobs=k: one entry per prompt token, {token id: log-prob} holding the
    # prompt's own token and the top k; None for the first token (nothing to condition on).
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # The generating engine's log-prob of each response token (vLLM's logprobs=0, of the raw
    # logits: logprobs_mode='raw_logprobs'); None where the backend gives none (hf, beam search).
    behaviour_logprobs: list[float] | None = None
