"""vllm_patch/generate_to_queue.py imports without vLLM, and its marked lines are the V1 block
the patch inserts (the block's behaviour on a fake engine: tests/vllm_patch/test_tool.py)."""

import inspect

from rlhf_pipe.vllm_patch import generate_to_queue
from rlhf_pipe.vllm_patch.methods import LINES


def test_the_v1_block_is_this_modules_code():
    source = inspect.getsource(generate_to_queue)
    assert LINES["v1-llm"].block.rstrip("\n") in source
    assert callable(generate_to_queue.GenerateToQueue.generate_to_queue)
