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
    specs = [
        parse_dataset_spec(f"{a}::2"),
        parse_dataset_spec(f"{b}::1"),
        parse_dataset_spec(f"{c}::1"),
    ]
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
    p.write_text(
        json.dumps({"prompt": "  "})
        + "\n"
        + json.dumps({"prompt": "ok"})
        + "\n"
        + json.dumps({"prompt": "word " * 100})
        + "\n"
    )
    src = PromptSource([parse_dataset_spec(str(p))], tok, batch_size=2, max_len=16)
    assert src.skipped == {"empty": 1, "too_long": 1, "too_short": 0}
    assert [x.text for x in src.next_batch()] == ["ok", "ok"]
    q = tmp_path / "e.jsonl"
    q.write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(DataError, match=r"e.jsonl:1: missing field 'prompt'"):
        PromptSource([parse_dataset_spec(str(q))], tok, batch_size=2, max_len=16)


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return str(path)


def test_small_ratio_is_honoured_across_steps(tmp_path, tiny_assets):
    # 1:19 with 4 prompts a step: a per-step quota rounds the small share to 0 for ever; the
    # share of everything drawn must still be 1/20, within one prompt at every step.
    tok = load_tokenizer(str(tiny_assets.policy))
    a = _jsonl(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(3)])
    b = _jsonl(tmp_path / "b.jsonl", [f"beta {i}" for i in range(7)])
    src = PromptSource(
        [parse_dataset_spec(f"{a}::0.05"), parse_dataset_spec(f"{b}::0.95")],
        tok,
        batch_size=4,
        max_len=32,
    )
    drawn = []
    for _step in range(50):
        drawn += [p.dataset for p in src.next_batch()]
        assert abs(drawn.count("a") - len(drawn) / 20) < 1
    assert drawn.count("a") == 10 and drawn.count("b") == 190
    # A step of another size (a 'fixed' step with replayed samples) keeps the mix.
    assert len(src.next_batch(3)) == 3


def test_min_prompt_length_skips_and_counts(tmp_path, tiny_assets):
    from rlhf_pipe.data import DataWarning

    tok = load_tokenizer(str(tiny_assets.policy))
    texts = ["hi", "a much longer prompt here", "ok", "another rather long prompt"]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    cut = min(lengths[1], lengths[3])
    assert max(lengths[0], lengths[2]) < cut
    path = _jsonl(tmp_path / "d.jsonl", texts)
    with pytest.warns(
        DataWarning,
        match=rf"d.jsonl: skipped 2 prompts shorter than "
        rf"min_prompt_length={cut} tokens",
    ):
        src = PromptSource([parse_dataset_spec(path)], tok, batch_size=4, max_len=32, min_len=cut)
    assert src.skipped == {"empty": 0, "too_long": 0, "too_short": 2}
    assert {p.text for p in src.next_batch()} == {texts[1], texts[3]}
    with (
        pytest.raises(DataError, match=r"no usable prompt .* shorter than 99 tokens: 4\)"),
        pytest.warns(DataWarning),
    ):
        PromptSource([parse_dataset_spec(path)], tok, batch_size=4, max_len=128, min_len=99)


def test_ranking_sorts_the_step_and_keeps_its_prompts(tmp_path, tiny_assets):
    from rlhf_pipe.data import rank_by_length

    tok = load_tokenizer(str(tiny_assets.policy))
    texts = ["one two three four five", "x", "one two three", "y y", "one two three four"]
    src = PromptSource(
        [parse_dataset_spec(_jsonl(tmp_path / "d.jsonl", texts))],
        tok,
        batch_size=5,
        max_len=32,
        seed=1,
    )
    batch = src.next_batch()
    ranked = rank_by_length(batch)
    assert [len(p.ids) for p in ranked] == sorted(len(p.ids) for p in batch)
    assert [len(p.ids) for p in ranked] != [len(p.ids) for p in batch]  # it did reorder
    assert sorted(p.text for p in ranked) == sorted(p.text for p in batch)
    assert [p.index for p in ranked] == list(range(5))


def test_relay_buffer_keeps_and_evicts_episodes():
    from rlhf_pipe.data import RelayBuffer

    def kept(max_episodes, offset, steps=6):
        buf = RelayBuffer(max_episodes, offset)
        for step in range(steps):
            buf.add(step, [{"sample": step}])
        return [e.episode_id for e in buf.episodes], buf

    assert kept(-1, 0)[0] == [0, 1, 2, 3, 4, 5]  # -1: every episode
    assert kept(0, 0)[0] == []  # 0: relay off
    assert kept(2, 0)[0] == [4, 5]  # k: the newest k
    assert kept(-1, 3)[0] == [3, 4, 5]  # nothing before the offset
    assert kept(2, 5)[0] == [5]
    ids, buf = kept(3, 1)
    assert ids == [3, 4, 5] and [e.buffer for e in buf.episodes][0] == [{"sample": 3}]
    again = RelayBuffer(3, 1)
    again.load_state_dict(buf.state_dict())
    again.add(6, [])
    assert [e.episode_id for e in again.episodes] == [4, 5, 6]


def test_pretrain_texts_are_mixed_by_ratio(tmp_path, tiny_assets):
    # PTX used to cycle through the files' concatenation, ignoring the ratios.
    from rlhf_pipe.trainer import RLHFTrainer
    from tests.conftest import tiny_config

    def texts(name, word):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(
            "".join(json.dumps({"text": f"{word} {i} {word}"}) + "\n" for i in range(5))
        )
        return str(path)

    tok = load_tokenizer(str(tiny_assets.policy))
    cfg = tiny_config(
        tmp_path,
        **{
            "model_configs.policy.generator_config.generator_type": "hf",  # no vLLM needed here
            "pretrain_dataset_config": {
                "samples_each_epoch": 4,
                "message_datasets": [f"{texts('a', 'alpha')}::1", f"{texts('b', 'beta')}::3"],
            },
        },
    )
    trainer = RLHFTrainer(cfg, console=False)
    drawn = [tok.decode(ids).split()[0] for _ in range(5) for ids in trainer.ptx.take()]
    trainer.close()
    assert drawn.count("alpha") == 5 and drawn.count("beta") == 15
