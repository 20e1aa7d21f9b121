"""vllm_patch/patching.py on a small stand-in llm.py: insert, revert byte for byte, refusals,
and the line hashes that name the first changed line (the tool on the real file:
tests/vllm_patch/test_tool.py)."""

import pytest

from rlhf_pipe.vllm_patch import patching
from rlhf_pipe.vllm_patch.methods import LINES, MARKER

LLM_PY = (
    "from typing import Callable, Sequence\n"
    "from tqdm import tqdm\n"
    "from vllm.lora.request import LoRARequest\n"
    "from vllm.outputs import RequestOutput\n"
    "from vllm.sampling_params import SamplingParams\n"
    "\n"
    "\n"
    "class LLM:\n"
    "    def generate(self):\n"
    "        pass\n"
    "\n"
    "    # keeps its comment\n"
    "    def enqueue(self):\n"
    "        pass\n"
)


def test_patch_goes_before_the_anchor_and_reverts_byte_for_byte():
    line = LINES["v1-llm"]
    patched = patching.patch_text(LLM_PY, line)
    assert patching.marker_line(patched) == 12
    assert patched.index(line.block) < patched.index("    # keeps its comment")
    compile(patched, "llm.py", "exec")
    assert patching.unpatch_text(patched) == LLM_PY
    assert patching.marker_line(LLM_PY) is None


def test_refusals_name_the_problem():
    line = LINES["v1-llm"]
    with pytest.raises(patching.PatchError, match="has no method `enqueue`"):
        patching.patch_text(LLM_PY.replace("enqueue", "other"), line)
    with pytest.raises(patching.PatchError, match="does not import tqdm"):
        patching.patch_text(LLM_PY.replace("from tqdm import tqdm\n", ""), line)
    with pytest.raises(patching.PatchError, match="is not patched"):
        patching.unpatch_text(LLM_PY)
    edited = patching.patch_text(LLM_PY, line).replace(MARKER + "\n", MARKER + "\n    x = 1\n")
    with pytest.raises(patching.PatchError, match="line 13 differs"):
        patching.unpatch_text(edited)


def test_first_difference_names_the_changed_line():
    hashes = patching.line_hashes(LLM_PY)
    assert patching.first_difference(LLM_PY, hashes) == (0, "")
    assert patching.first_difference(LLM_PY.replace("pass", "return", 1), hashes) == (
        10,
        "        return",
    )
    assert patching.first_difference("", hashes)[0] == 1
