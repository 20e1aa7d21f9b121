"""vllm_patch/methods.py: each API line's block is one marked, compilable piece of a class."""

import textwrap

from rlhf_pipe.vllm_patch.methods import END_MARKER, LINES, MARKER, marked_block


def test_marked_block_takes_marker_to_end_marker():
    text = f"a\n    {MARKER}\n    x = 1\n    {END_MARKER}\nb\n"
    assert marked_block(text) == f"    {MARKER}\n    x = 1\n    {END_MARKER}\n\n"


def test_every_block_is_marked_and_compiles_in_a_class():
    for line in LINES.values():
        lines = line.block.strip("\n").split("\n")
        assert lines[0].strip() == MARKER and lines[-1].strip() == END_MARKER, line.name
        assert line.block.endswith("\n\n")
        compile("class LLM:\n" + textwrap.indent(textwrap.dedent(line.block), "    "), "b", "exec")
