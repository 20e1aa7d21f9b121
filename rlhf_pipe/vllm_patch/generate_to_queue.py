"""`LLM.generate_to_queue` for vLLM's V1 API: the code the patch tool writes into vLLM's
`class LLM`, and the methods added to it at run time where vLLM is not patched.

One source: the methods below, between the two marker comments, are the block the patch
tool inserts (rlhf_pipe.vllm_patch.methods.V1_BLOCK is read from this file), so the patched
and the run-time method are the same code. The block only uses names that vLLM's
`entrypoints/llm.py` imports (methods.REQUIRED_NAMES); here they are imported for the type
checker and, for `tqdm`, at run time.

Contract kept from the original hand edit:
- every finished `RequestOutput` is `queue.put` the moment the engine reports it finished;
- the return value holds every finished output, sorted by request id (the submission counter);
- `use_tqdm` draws a bar over finished requests; `lora_request` goes to every request;
- `queue=None` makes it behave like `generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tqdm.auto import tqdm  # as vLLM's llm.py imports it

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.outputs import RequestOutput
    from vllm.sampling_params import SamplingParams


class GenerateToQueue:
    """Holder of the methods; at run time they become methods of `vllm.LLM`."""

    # The block is vLLM's code style (the diff must apply to its file), not ruff's.
    # fmt: off
    # rlhf_pipe: generate_to_queue patch
    # Added by `rlhf-pipe apply-vllm-patch` for the vLLM V1 API; `--revert` removes it.
    def generate_to_queue(
        self,
        prompts: str | list[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: list[list[int]] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: LoRARequest | None = None,
        queue=None,
    ) -> list[RequestOutput]:
        """Like `generate`, and `queue.put(output)` as soon as each request finishes.

        `prompts` are strings; `prompt_token_ids` are token id lists, sent as
        `TokensPrompt` dicts (paired with `prompts` when both are given).
        `sampling_params` is one `SamplingParams` or one per prompt.
        Returns all finished outputs sorted by request id, as `generate` does.
        """
        if prompts is None and prompt_token_ids is None:
            raise ValueError("Either prompts or prompt_token_ids must be provided.")
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompt_token_ids is None:
            engine_prompts = list(prompts)
        elif prompts is None:
            engine_prompts = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        elif len(prompts) != len(prompt_token_ids):
            raise ValueError(
                "The lengths of prompts and prompt_token_ids must be the same."
            )
        else:
            engine_prompts = [
                {"prompt": text, "prompt_token_ids": ids}
                for text, ids in zip(prompts, prompt_token_ids)
            ]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()

        self.enqueue(
            engine_prompts, sampling_params, lora_request=lora_request, use_tqdm=False
        )
        return self._run_engine_to_queue(use_tqdm, queue)

    def _run_engine_to_queue(
        self, use_tqdm: bool | Callable[..., tqdm] = True, queue=None
    ) -> list[RequestOutput]:
        # `_run_engine`, plus one `queue.put` per request when it finishes.
        pbar = None
        if use_tqdm:
            tqdm_func = use_tqdm if callable(use_tqdm) else tqdm
            pbar = tqdm_func(
                total=self.llm_engine.get_num_unfinished_requests(),
                desc="Processed prompts",
                dynamic_ncols=True,
            )
        outputs: list[RequestOutput] = []
        while self.llm_engine.has_unfinished_requests():
            for output in self.llm_engine.step():
                if output.finished:
                    outputs.append(output)
                    if queue is not None:
                        queue.put(output)
                    if pbar is not None:
                        pbar.update(1)
        if pbar is not None:
            pbar.close()
        # Requests finish out of order; the request id is the submission counter
        # (`enqueue` returns it with a suffix, `RequestOutput.request_id` without).
        return sorted(outputs, key=lambda output: int(output.request_id))
    # rlhf_pipe: end of generate_to_queue patch
    # fmt: on
