"""vllm_patch/sources.py: the generated fingerprints module reads back as what was checked."""

from rlhf_pipe.vllm_patch.sources import _render_fingerprints


def test_rendered_fingerprints_round_trip():
    releases = {"0.21.0": ("v1-llm", "ab" * 32)}
    hashes = {"ab" * 32: "0123" * 50}
    namespace: dict = {}
    exec(_render_fingerprints(releases, hashes), namespace)
    assert namespace["RELEASES"] == releases
    assert namespace["LINE_HASHES"] == hashes
