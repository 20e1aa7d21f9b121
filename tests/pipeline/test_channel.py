import threading
import time

import pytest
import torch

from rlhf_pipe.pipeline.batch import Sample, collate
from rlhf_pipe.pipeline.channel import END, Channel, PipelineAborted, StageTimeout


def test_bounded_put_blocks_then_times_out():
    ch = Channel("a->b", maxsize=1, abort=threading.Event(), timeout_s=0.3)
    ch.put(1)
    start = time.monotonic()
    with pytest.raises(StageTimeout, match="consumer took no item"):
        ch.put(2)
    assert 0.25 < time.monotonic() - start < 2.0


def test_get_times_out_and_abort_wakes_waiters():
    abort = threading.Event()
    ch = Channel("a->b", maxsize=2, abort=abort, timeout_s=0.2)
    with pytest.raises(StageTimeout, match="no item from the producer"):
        ch.get()
    ch2 = Channel("c->d", maxsize=2, abort=abort, timeout_s=60)
    threading.Timer(0.2, abort.set).start()
    start = time.monotonic()
    with pytest.raises(PipelineAborted):
        ch2.get()
    assert time.monotonic() - start < 2.0


def test_iteration_stops_at_end():
    ch = Channel("x", maxsize=4, abort=threading.Event(), timeout_s=1)
    for i in range(3):
        ch.put(i)
    ch.close()
    assert list(ch) == [0, 1, 2]
    assert repr(END) == "END"


def test_collate_pads_prompt_left_response_right():
    s1 = Sample(0, 0, 0, torch.tensor([5, 6, 7]), torch.tensor([8]))
    s2 = Sample(1, 1, 0, torch.tensor([9]), torch.tensor([10, 11, 12]))
    b = collate([s1, s2], pad_id=0)
    # P = 3, R = 3
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 0, 0], [0, 0, 9, 10, 11, 12]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 3, 3], [0, 0, 0, 1, 2, 3]]
    assert b.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert b.last_index.tolist() == [3, 5]
