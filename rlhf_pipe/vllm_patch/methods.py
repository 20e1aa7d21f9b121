"""The block inserted into vLLM's `class LLM`, one per API line (V1's is importable Python:
rlhf_pipe/vllm_patch/generate_to_queue.py).

Each block starts with MARKER and ends with END_MARKER plus one blank line, and goes right in
front of the `def` of its line's anchor method. It only uses names that the target
`vllm/entrypoints/llm.py` already imports (REQUIRED_NAMES, checked before patching).

Contract kept from the original hand edit:
- every finished `RequestOutput` is `queue.put` the moment the engine reports it finished;
- the return value holds every finished output, sorted by request id (the submission counter);
- `use_tqdm` draws a bar over finished requests; `lora_request` goes to every request;
- `queue=None` makes it behave like `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MARKER = "# rlhf_pipe: generate_to_queue patch"
END_MARKER = "# rlhf_pipe: end of generate_to_queue patch"

# vLLM 0.3.3: `_add_request(prompt, sampling_params, token_ids, lora_request=, prefix_pos=)`,
# one SamplingParams for all prompts, run loop `_run_engine` in llm.py.
LEGACY_0_3_BLOCK = '''\
    # rlhf_pipe: generate_to_queue patch
    # Added by `rlhf-pipe apply-vllm-patch` for the vLLM 0.3.x API; `--revert` removes it.
    def generate_to_queue(
        self,
        prompts: Optional[Union[str, List[str]]] = None,
        sampling_params: Optional[SamplingParams] = None,
        prompt_token_ids: Optional[List[List[int]]] = None,
        prefix_pos: Optional[Union[int, List[int]]] = None,
        use_tqdm: bool = True,
        lora_request: Optional[LoRARequest] = None,
        queue=None,
    ) -> List[RequestOutput]:
        """Like `generate`, and `queue.put(output)` as soon as each request finishes.

        Returns all finished outputs sorted by request id, as `generate` does.
        """
        if prompts is None and prompt_token_ids is None:
            raise ValueError("Either prompts or prompt_token_ids must be "
                             "provided.")
        if isinstance(prompts, str):
            prompts = [prompts]
        if (prompts is not None and prompt_token_ids is not None
                and len(prompts) != len(prompt_token_ids)):
            raise ValueError("The lengths of prompts and prompt_token_ids "
                             "must be the same.")
        if sampling_params is None:
            sampling_params = SamplingParams()

        num_requests = (len(prompts)
                        if prompts is not None else len(prompt_token_ids))
        for i in range(num_requests):
            self._add_request(
                prompts[i] if prompts is not None else None,
                sampling_params,
                prompt_token_ids[i] if prompt_token_ids is not None else None,
                lora_request=lora_request,
                prefix_pos=prefix_pos[i] if prefix_pos is not None else None)
        return self._run_engine_to_queue(use_tqdm, queue)

    def _run_engine_to_queue(self, use_tqdm: bool,
                             queue=None) -> List[RequestOutput]:
        # `_run_engine`, plus one `queue.put` per request when it finishes.
        if use_tqdm:
            pbar = tqdm(total=self.llm_engine.get_num_unfinished_requests(),
                        desc="Processed prompts")
        outputs: List[RequestOutput] = []
        while self.llm_engine.has_unfinished_requests():
            for output in self.llm_engine.step():
                if output.finished:
                    outputs.append(output)
                    if queue is not None:
                        queue.put(output)
                    if use_tqdm:
                        pbar.update(1)
        if use_tqdm:
            pbar.close()
        # Requests finish out of order; the request id is the submission counter.
        return sorted(outputs, key=lambda output: int(output.request_id))
    # rlhf_pipe: end of generate_to_queue patch

'''

# vLLM 0.20-0.33 (V1 engine): prompts go in through the public `enqueue` (which renders them
# and calls the inherited `_add_request`), then the same step loop as `_run_engine`, wherever
# that loop lives (llm.py, entrypoints/offline_utils.py or entrypoints/common/offline.py).
# The block is the code of rlhf_pipe/vllm_patch/generate_to_queue.py, read as text (importing
# this module imports neither that one nor vLLM).
V1_SOURCE = Path(__file__).with_name("generate_to_queue.py")


def marked_block(text: str) -> str:
    """The lines from MARKER to END_MARKER (both included) of `text`, and the blank line that
    ends an inserted block."""
    lines = text.split("\n")
    stripped = [line.strip() for line in lines]
    start, end = stripped.index(MARKER), stripped.index(END_MARKER)
    return "\n".join(lines[start : end + 1]) + "\n\n"


V1_BLOCK = marked_block(V1_SOURCE.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class ApiLine:
    name: str  # also the file name patches/<name>.diff
    summary: str
    block: str  # text inserted into class LLM
    anchor: str  # the block goes right before `def <anchor>(` in class LLM
    required_names: tuple[str, ...]  # module-level names of llm.py the block uses
    reference: str  # the vLLM release patches/<name>.diff is made against


_V1_NAMES = ("Callable", "LoRARequest", "RequestOutput", "SamplingParams", "Sequence", "tqdm")

LINES: dict[str, ApiLine] = {
    line.name: line
    for line in (
        ApiLine(
            "legacy-0.3",
            "vLLM 0.3.x: _add_request(..., prefix_pos=), loop in llm.py",
            LEGACY_0_3_BLOCK,
            "_add_request",
            ("LoRARequest", "List", "Optional", "RequestOutput", "SamplingParams", "Union", "tqdm"),
            "0.3.3",
        ),
        ApiLine(
            "v1-llm",
            "V1 engine, LLM and its run loop in entrypoints/llm.py",
            V1_BLOCK,
            "enqueue",
            _V1_NAMES,
            "0.21.0",
        ),
        ApiLine(
            "v1-offline-utils",
            "V1 engine, run loop in entrypoints/offline_utils.py",
            V1_BLOCK,
            "enqueue",
            _V1_NAMES,
            "0.31.0",
        ),
        ApiLine(
            "v1-common-offline",
            "V1 engine, run loop in entrypoints/common/offline.py",
            V1_BLOCK,
            "enqueue",
            _V1_NAMES,
            "0.32.0",
        ),
    )
}
