"""Pure text functions of the vLLM patch: no file writes, no vLLM import.

`text` is always the whole of a `vllm/entrypoints/llm.py`, decoded as UTF-8. Lines are
counted as an editor does (split on "\\n", first line is 1).
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import re
from pathlib import Path

from rlhf_pipe.vllm_patch.methods import LINES, MARKER, ApiLine

LLM_PY = "vllm/entrypoints/llm.py"  # as named in the diffs, relative to site-packages


class PatchError(Exception):
    """A refusal: the message says why and what to do. Nothing has been written."""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def line_hashes(text: str) -> str:
    """4 hex digits of sha256 per line, concatenated: enough to find the first changed line."""
    return "".join(
        hashlib.sha256(line.encode("utf-8")).hexdigest()[:4] for line in text.split("\n")
    )


def first_difference(text: str, expected_hashes: str) -> tuple[int, str]:
    """(1-based line number, that line of `text`) where `text` first leaves the released file.

    A line of "" past the end of `text` means `text` is shorter. (0, "") when every line
    matches (then only bytes that are not lines differ, which split("\\n") cannot show).
    """
    lines = text.split("\n")
    expected = [expected_hashes[i : i + 4] for i in range(0, len(expected_hashes), 4)]
    for i, line in enumerate(lines):
        if i >= len(expected) or line_hashes(line) != expected[i]:
            return i + 1, line
    if len(lines) < len(expected):
        return len(lines) + 1, ""
    return 0, ""


def marker_line(text: str) -> int | None:
    """1-based line of the patch marker, or None when the file is not patched."""
    for i, line in enumerate(text.split("\n")):
        if line.strip() == MARKER:
            return i + 1
    return None


def read_version(vllm_dir: Path) -> str | None:
    """vLLM's version as written in its package files, without importing it."""
    pattern = re.compile(r"""^__version__\s*=\s*(?:version\s*=\s*)?["']([^"']+)["']""", re.M)
    for name in ("_version.py", "version.py", "__init__.py"):
        path = vllm_dir / name
        if path.is_file():
            match = pattern.search(path.read_text(encoding="utf-8", errors="replace"))
            if match:
                return match.group(1)
    return None


def detect_line(vllm_dir: Path, text: str) -> str | None:
    """API line from the package layout; used only for versions without a fingerprint."""
    if (vllm_dir / "entrypoints" / "common" / "offline.py").is_file():
        return "v1-common-offline"
    if (vllm_dir / "entrypoints" / "offline_utils.py").is_file():
        return "v1-offline-utils"
    if "    def enqueue(" in text:
        return "v1-llm"
    if "    def _add_request(" in text and "prefix_pos" in text:
        return "legacy-0.3"
    return None


def _module_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset == 0:
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def insert_index(text: str, line: ApiLine) -> int:
    """0-based index of the line the block goes in front of; PatchError if the layout is off."""
    try:
        tree = ast.parse(text)
    except SyntaxError as err:
        raise PatchError(f"{LLM_PY} does not parse: line {err.lineno}: {err.msg}") from None
    cls = next(
        (node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "LLM"), None
    )
    if cls is None:
        raise PatchError(f"{LLM_PY} has no top-level `class LLM`")
    methods: dict[str, ast.FunctionDef] = {}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            methods.setdefault(node.name, node)
    if "generate_to_queue" in methods:
        raise PatchError(
            f"{LLM_PY} line {methods['generate_to_queue'].lineno}: class LLM already defines "
            "generate_to_queue without the rlhf_pipe marker (a hand edit?); reinstall vLLM "
            "to get the released file back, then run this tool"
        )
    anchor = methods.get(line.anchor)
    if anchor is None:
        raise PatchError(
            f"class LLM in {LLM_PY} has no method `{line.anchor}`, which the "
            f"{line.name} patch goes in front of"
        )
    missing = sorted(set(line.required_names) - _module_names(tree))
    if missing:
        raise PatchError(
            f"{LLM_PY} does not import {', '.join(missing)}, which the {line.name} patch uses"
        )
    index = min([anchor.lineno] + [d.lineno for d in anchor.decorator_list]) - 1
    lines = text.split("\n")
    while index > 0 and lines[index - 1].strip().startswith("#"):  # keep comments on the def
        index -= 1
    return index


def patch_text(text: str, line: ApiLine) -> str:
    """`text` with the line's block inserted into class LLM."""
    lines = text.split("\n")
    index = insert_index(text, line)
    head = "\n".join(lines[:index]) + "\n" if index else ""
    return head + line.block + "\n".join(lines[index:])


def unpatch_text(text: str) -> str:
    """`text` with the block this tool inserted taken out again, byte for byte."""
    for block in {line.block for line in LINES.values()}:
        if block in text:
            return text.replace(block, "", 1)
    start = marker_line(text)
    if start is None:
        raise PatchError(f"{LLM_PY} is not patched")
    lines = text.split("\n")[start - 1 :]
    best = 0
    for block in {line.block for line in LINES.values()}:
        same = 0
        for have, want in zip(lines, block.split("\n")):
            if have != want:
                break
            same += 1
        best = max(best, same)
    raise PatchError(
        f"{LLM_PY} line {start + best} differs from the block this tool inserts (marker at line "
        f"{start}; changed after patching, or written by another rlhf_pipe version): "
        f"{lines[best] if best < len(lines) else ''!r}"
    )


def unified_diff(old: str, new: str) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"a/{LLM_PY}",
            tofile=f"b/{LLM_PY}",
        )
    )


def patch_file_text(line: ApiLine, original: str) -> str:
    """Contents of patches/<line>.diff: a short header, then the diff `patch -p1` applies."""
    header = (
        f"rlhf_pipe: add LLM.generate_to_queue and LLM._run_engine_to_queue\n"
        f"API line: {line.name} ({line.summary})\n"
        f"Made against: vLLM {line.reference}, {LLM_PY} sha256 {sha256(original)}\n"
        f"Apply from site-packages: patch -p1 < {line.name}.diff "
        f"(or: rlhf-pipe apply-vllm-patch)\n\n"
    )
    return header + unified_diff(original, patch_text(original, line))
