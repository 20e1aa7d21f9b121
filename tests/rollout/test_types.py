"""rollout/types.py: the answer-length cap of a request and the drawn lengths."""

import pytest

from rlhf_pipe.rollout.types import SamplingSettings, drawn_length


def test_max_tokens_is_max_new_tokens_without_a_sequence_limit():
    assert SamplingSettings(max_new_tokens=8).max_tokens(prompt_len=5) == 8


def test_max_tokens_fills_the_sequence_with_max_seq_len():
    s = SamplingSettings(max_new_tokens=8, max_seq_len=12)
    assert s.max_tokens(prompt_len=5) == 7
    assert s.max_tokens(prompt_len=2) == 10


@pytest.mark.parametrize("lo,hi", [(1, 1), (2, 9), (4, 40)])
def test_drawn_length_is_in_range_and_a_function_of_the_seed(lo, hi):
    lengths = [drawn_length((lo, hi), seed) for seed in range(200)]
    assert all(lo <= n <= hi for n in lengths)
    assert lengths == [drawn_length((lo, hi), seed) for seed in range(200)]
    if hi > lo:
        assert len(set(lengths)) > 1
