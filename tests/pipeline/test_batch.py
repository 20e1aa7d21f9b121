"""pipeline/batch.py: padding and packing put every token where the model and the losses
expect it, and pad_field / unpad_into are inverses."""

import torch

from rlhf_pipe.pipeline.batch import Sample, chunks, collate, pad_field, unpad_into


def _samples():
    # prompt lengths 2 and 1; answers 1 and 3 tokens
    return [
        Sample(0, 0, 0, torch.tensor([5, 6]), torch.tensor([7])),
        Sample(1, 1, 0, torch.tensor([8]), torch.tensor([9, 10, 11])),
    ]


def test_pad_left_pads_prompts_and_right_pads_answers():
    b = collate(_samples(), pad_id=0)
    # P = 2, R = 3
    assert b.prompt_width == 2
    assert b.input_ids.tolist() == [[5, 6, 7, 0, 0], [0, 8, 9, 10, 11]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 2, 2], [0, 0, 1, 2, 3]]
    assert b.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert b.last_index.tolist() == [2, 4]
    assert b.labels.tolist() == [[7, 0, 0], [9, 10, 11]]


def test_pack_puts_samples_back_to_back_and_rows_scatters_back():
    b = collate(_samples(), pad_id=0, packed=True)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    # position p predicts token p + 1: 6 -> 7, then 8 -> 9, 9 -> 10, 10 -> 11
    assert b.predict_index.tolist() == [1, 3, 4, 5]
    assert b.labels.tolist() == [7, 9, 10, 11]
    assert b.last_index.tolist() == [2, 6]
    rows = b.rows(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert rows.tolist() == [[1.0, 0.0, 0.0], [2.0, 3.0, 4.0]]


def test_an_empty_answer_ends_at_the_prompt():
    s = [Sample(0, 0, 0, torch.tensor([5, 6]), torch.tensor([], dtype=torch.long))]
    b = collate(s, pad_id=0)
    assert b.response_mask.tolist() == [[0.0]]  # R is at least 1
    assert b.last_index.tolist() == [1]


def test_pad_field_and_unpad_into_round_trip():
    samples = _samples()
    samples[0].values = torch.tensor([0.5])
    samples[1].values = torch.tensor([1.0, 2.0, 3.0])
    padded = pad_field(samples, "values", 3)
    assert padded.tolist() == [[0.5, 0.0, 0.0], [1.0, 2.0, 3.0]]
    unpad_into(samples, "advantages", padded * 2)
    assert samples[0].advantages.tolist() == [1.0]
    assert samples[1].advantages.tolist() == [2.0, 4.0, 6.0]


def test_chunks_keeps_order_and_the_short_tail():
    assert chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
