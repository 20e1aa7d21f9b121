import json

import pytest

from rlhf_pipe.data import DataError, PromptSource, parse_dataset_spec, read_records
from rlhf_pipe.models import load_tokenizer


def test_dataset_spec_strings():
    s = parse_dataset_spec("data/a.jsonl::0.25[SYS]:math", {"SYS": "You are terse."})
    assert (s.path, s.ratio, s.system, s.name) == ("data/a.jsonl", 0.25, "You are terse.", "math")
    s = parse_dataset_spec("data/b.json")
    assert (s.path, s.ratio, s.system, s.name) == ("data/b.json", 1.0, None, "b")
    s = parse_dataset_spec("b.jsonl[literal system prompt]")
    assert s.system == "literal system prompt"
    with pytest.raises(DataError, match="ratio 'x' is not a number"):
        parse_dataset_spec("a.jsonl::x")
    with pytest.raises(DataError, match="ratio must be > 0"):
        parse_dataset_spec("a.jsonl::0")


def test_read_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        read_records(str(p))
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid UTF-8"):
        read_records(str(p))
    p.write_text("")
    with pytest.raises(DataError, match="holds no records"):
        read_records(str(p))
    p.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: expected a JSON object, got list"):
        read_records(str(p))


def test_mixing_ratios_formats_and_deterministic_order(tmp_path, tiny_assets):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = load_tokenizer(str(tiny_assets.policy))
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"alpha {i}"}) + "\n" for i in range(10)))
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"prompt": f"beta {i}"} for i in range(10)]))
    c = tmp_path / "c.parquet"
    pq.write_table(pa.table({"prompt": [f"gamma {i}" for i in range(10)]}), c)
    specs = [parse_dataset_spec(f"{a}::2"), parse_dataset_spec(f"{b}::1"),
             parse_dataset_spec(f"{c}::1")]
    src = PromptSource(specs, tok, batch_size=8, max_len=32, seed=3)
    batch = src.next_batch()
    assert [p.index for p in batch] == list(range(8))
    assert [p.dataset for p in batch].count("a") == 4
    assert [p.dataset for p in batch].count("b") == 2
    assert [p.dataset for p in batch].count("c") == 2
    # Same seed, same order; the position alone restores it.
    again = PromptSource(specs, tok, batch_size=8, max_len=32, seed=3)
    assert [p.text for p in again.next_batch()] == [p.text for p in batch]
    state = src.state_dict()
    nxt = [p.text for p in src.next_batch()]
    again.load_state_dict(state)
    assert [p.text for p in again.next_batch()] == nxt


def test_empty_and_long_prompts_are_counted(tmp_path, tiny_assets):
    tok = load_tokenizer(str(tiny_assets.policy))
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "  "}) + "\n" + json.dumps({"prompt": "ok"}) + "\n"
                 + json.dumps({"prompt": "word " * 100}) + "\n")
    src = PromptSource([parse_dataset_spec(str(p))], tok, batch_size=2, max_len=16)
    assert src.skipped == {"empty": 1, "too_long": 1}
    assert [x.text for x in src.next_batch()] == ["ok", "ok"]
    q = tmp_path / "e.jsonl"
    q.write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(DataError, match=r"e.jsonl:1: missing field 'prompt'"):
        PromptSource([parse_dataset_spec(str(q))], tok, batch_size=2, max_len=16)
