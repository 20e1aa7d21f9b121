"""Plain transformers `generate`, a protocols.RolloutEngine for machines without vLLM.

It has no continuous batching, so requests finish chunk by chunk; within a chunk they are put
in order of their answer length (shortest first), imitating completion order.
"""

from __future__ import annotations

import time

import torch

from rlhf_pipe.rollout.gc_pause import paused_gc
from rlhf_pipe.rollout.types import Completion, SamplingSettings


class HFEngine:
    def __init__(
        self,
        model,
        pad_token_id: int,
        eos_token_id: int | None,
        chunk_size: int = 8,
        engine_index: int = 0,
        pause_gc: bool = True,
    ):
        self.model = model.eval()
        self.pause_gc = pause_gc
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.chunk_size, self.engine_index = chunk_size, engine_index
        self.version = 0
        self.last_sync: dict = {}

    def generate(self, prompt_ids, prompt_indices, settings: SamplingSettings, seeds, sink):
        if settings.stop:
            raise ValueError("the hf rollout backend does not support stop strings; use vllm")
        with paused_gc(self.pause_gc):
            self._generate(prompt_ids, prompt_indices, settings, seeds, sink)

    @torch.no_grad()
    def _generate(self, prompt_ids, prompt_indices, settings: SamplingSettings, seeds, sink):
        device = next(self.model.parameters()).device
        for start in range(0, len(prompt_ids), self.chunk_size):
            chunk = prompt_ids[start : start + self.chunk_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            torch.manual_seed(seeds[start])
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                # new_token_limit=False: long enough for the shortest prompt; rows cut below.
                max_new_tokens=max(settings.max_tokens(len(p)) for p in chunk),
                do_sample=settings.temperature > 0,
                temperature=settings.temperature or None,
                top_p=settings.top_p,
                top_k=settings.top_k if settings.top_k > 0 else None,
                num_return_sequences=settings.n,
                pad_token_id=self.pad_token_id,
                eos_token_id=None if settings.ignore_eos else self.eos_token_id,
            )
            answers = out[:, width:].tolist()
            done = []
            for row, answer in enumerate(answers):
                i, k = divmod(row, settings.n)
                answer = answer[: settings.max_tokens(len(chunk[i]))]
                if not settings.ignore_eos and self.eos_token_id in answer:
                    answer = answer[: answer.index(self.eos_token_id) + 1]
                    reason = "stop"
                else:
                    answer = [t for t in answer if t != self.pad_token_id]
                    reason = "length"
                pidx = prompt_indices[start + i]
                done.append(
                    Completion(
                        pidx * settings.n + k,
                        pidx,
                        list(chunk[i]),
                        answer,
                        reason,
                        self.version,
                        self.engine_index,
                    )
                )
            for c in sorted(done, key=lambda c: len(c.response_ids)):
                sink.put(c)

    def load_weights(self, named_tensors, version: int) -> dict:
        start = time.perf_counter()
        state = dict(named_tensors)
        self.model.load_state_dict(state, strict=True)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        seconds = time.perf_counter() - start
        self.version = version
        self.last_sync = {
            "seconds": seconds,
            "bytes": nbytes,
            "gbps": nbytes / max(seconds, 1e-9) / 1e9,
        }
        return self.last_sync
