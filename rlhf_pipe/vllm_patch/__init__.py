"""Add `generate_to_queue` / `_run_engine_to_queue` to vLLM's `class LLM`, on disk.

The reference system asked users to paste two methods into the installed
`vllm/entrypoints/llm.py` by hand. `rlhf-pipe apply-vllm-patch` does it for them:

    methods.py       the inserted block, one per vLLM API line
    patching.py      pure text functions: insert, remove, compare with a released file
    fingerprints.py  sha256 (whole file and per line) of each checked release's llm.py
    tool.py          the command: find vLLM, read its version, check, write atomically
    sources.py       fetch a release's source with pip (tests, and refreshing fingerprints)

Importing this package (or any module above) never imports vLLM.
"""
