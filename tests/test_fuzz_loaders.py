"""Fuzzing the config and data loaders: any input gives a valid result or a one-line error that
names its source, never another exception.

(a) the tiny example's config dict with random keys set, replaced or deleted -> `from_dict`;
(b) random bytes and JSON lines in .jsonl/.json/.txt/.parquet files -> `read_records`, `PromptSource`;
(c) random dataset spec strings -> `parse_dataset_spec`, plus a round trip of well-formed ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from rlhf_pipe.config import SECTIONS, ConfigError, RunConfig
from rlhf_pipe.data import DataError, PromptSource, parse_dataset_spec, read_records
from rlhf_pipe.models import load_tokenizer
from rlhf_pipe.validation import from_dict
from tests.conftest import TINY_CONFIG

SOURCE = "fuzz.py"


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def _one_line_from(err: Exception, prefix: str) -> None:
    text = str(err)
    assert len(text.splitlines()) == 1, text
    assert text.startswith(prefix), text


# ----------------------------------------------------------------------------- (a) configs


def _key_paths(cls, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections and nested sections included."""
    paths = []
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        paths.append(path)
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or [tp]
        if dataclasses.is_dataclass(inner[0]):
            paths += _key_paths(inner[0], path + ".")
    return paths


KEY_PATHS = [p for p in _key_paths(RunConfig) if p.split(".")[0] in SECTIONS]
KEY_PATHS += [
    "PIPE_MICRO_BATCH_NUM",
    "model_configs.policy.trainer_config.parallel.data.size",
    "model_configs.critic.trainer_config.parallel.tensor.size",
]


@pytest.fixture(scope="module")
def base_raw(tiny_assets):
    from mmengine import Config

    raw = Config.fromfile(str(TINY_CONFIG), lazy_import=False).to_dict()
    raw["train_config"].update(tensorboard=False, progress_bar=False)
    return raw


def _fill(value, tiny_assets):
    """Replace the "<policy>", "<critic>", "<prompts>" placeholders with the tiny assets' paths."""
    if isinstance(value, str):
        for name in ("policy", "critic", "prompts"):
            value = value.replace(f"<{name}>", str(getattr(tiny_assets, name)))
        return value
    if isinstance(value, list):
        return [_fill(v, tiny_assets) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, tiny_assets) for k, v in value.items()}
    return value


# Values that are often right for some key, so that fuzzed configs also pass.
_near_valid = st.sampled_from(
    [
        "vllm",
        "hf",
        "k1",
        "k3",
        "abs",
        "left",
        "batch",
        "running",
        "float32",
        "bfloat16",
        "cpu",
        "token_mean",
        "<policy>",
        "<critic>",
        "/nonexistent",
        "rlhf_pipe.assets.tiny:digit_reward",
        "no_colon",
        "<prompts>::1.0:digits",
        ["<prompts>"],
        ["a.jsonl::0"],
        [0.9, 0.95],
        [0.9],
        {"size": 2},
        1,
        2,
        4,
        8,
        16,
        0.5,
    ]
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    _near_valid,
    _near_valid,
)
_keys = st.one_of(
    st.text(max_size=8),
    st.integers(-2, 2),
    st.sampled_from([p.rsplit(".", 1)[-1] for p in KEY_PATHS]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=3)),
    max_leaves=8,
)
_ops = st.lists(st.tuples(st.sampled_from(KEY_PATHS), _values, st.booleans()), max_size=3)
_extra = st.dictionaries(
    st.one_of(
        st.text(max_size=10),
        st.sampled_from(["PIPE_MICRO_BATCH_NUM", "_private", "MY_CONST", "rollout_confg"]),
    ),
    _values,
    max_size=1,
)


def _apply(raw: dict, path: str, value, delete: bool) -> None:
    node = raw
    *parents, leaf = path.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            if delete:
                return
            node[p] = {}
        node = node[p]
    if delete:
        node.pop(leaf, None)
    else:
        node[leaf] = value


@fuzz(1000)
@given(ops=_ops, extra=_extra)
@example(ops=[], extra={})  # the untouched example is a valid run
def test_fuzz_from_dict(base_raw, tiny_assets, ops, extra):
    raw = copy.deepcopy(base_raw)
    for path, value, delete in ops:
        _apply(raw, path, _fill(value, tiny_assets), delete)
    raw.update(extra)
    try:
        cfg = from_dict(raw, SOURCE)
    except ConfigError as e:
        _one_line_from(e, f"{SOURCE}: ")
        event("ConfigError")
        return
    event("valid")
    # A config that passes is one the trainer can slice: every size divides.
    t, total, m = cfg.train_config, cfg.plan.samples_per_step, cfg.pipe_micro_batch_num
    assert cfg.plan.pipe_micro_bs * m == total
    mbs = cfg.plan.pipe_micro_bs
    assert mbs % t.train_micro_bs == 0 and mbs % t.infer_micro_bs == 0
    assert total % t.num_mini_batches == 0
    assert (total // t.num_mini_batches) % t.train_micro_bs == 0
    assert cfg.model_configs.policy.model_path
    assert cfg.model_configs.reward.model_path or cfg.model_configs.reward.reward_fn
    for spec in cfg.prompt_dataset_config.message_datasets:
        assert parse_dataset_spec(spec).ratio > 0
    for role in ("policy", "critic", "reference", "reward"):
        model = getattr(cfg.model_configs, role)
        if model is not None:
            betas = model.trainer_config.betas
            assert len(betas) == 2 and all(isinstance(b, (int, float)) for b in betas)
            assert 0.0 <= model.trainer_config.lr <= 1.0  # NaN fails this


# ----------------------------------------------------------------------------- (b) data files


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return load_tokenizer(str(tiny_assets.policy))


_json = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_prompt = st.one_of(
    st.text(max_size=40),
    st.just(""),
    st.just("digits " * 30),
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=10)}
        ),
        max_size=2,
    ),
)
_good = st.fixed_dictionaries({"prompt": _prompt})
_record = st.one_of(_good, _good, _good, _json)  # mostly well formed
_bad_line = st.one_of(
    st.text(max_size=20).map(str.encode),
    st.binary(max_size=20),
    _json.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b'{"prompt": "\\ud800"}', b'{"prompt": ', b"\xff\xfe", b"[" * 3000, b"  "]),
)
_good_lines = st.lists(_good.map(lambda r: json.dumps(r).encode()), max_size=5)


@st.composite
def _jsonl(draw):
    """Good lines, and at times one bad line somewhere among them."""
    lines = draw(_good_lines)
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(_bad_line))
    return b"\n".join(lines)


_exts = st.sampled_from([".jsonl", ".json", ".txt", ".parquet"])
_file = st.one_of(  # (content, extension): mostly the extension that fits the content
    st.tuples(_jsonl(), st.sampled_from([".jsonl", ".jsonl", ".txt"]) | _exts),
    st.tuples(
        st.lists(_record, max_size=5).map(lambda rs: json.dumps(rs, indent=1).encode()),
        st.just(".json") | _exts,
    ),
    st.tuples(st.binary(max_size=60), _exts),
)


@fuzz(800)
@given(file=_file)
def test_fuzz_data_files(tmp_path, tokenizer, file):
    content, ext = file
    path = tmp_path / f"data{ext}"
    path.write_bytes(content)
    try:
        records = read_records(str(path))
    except DataError as e:
        _one_line_from(e, str(path))
        event("DataError in read_records")
        return
    assert records and all(isinstance(n, int) and isinstance(r, dict) for n, r in records)
    try:
        src = PromptSource([parse_dataset_spec(str(path))], tokenizer, batch_size=3, max_len=16)
    except DataError as e:
        _one_line_from(e, str(path))
        event("DataError in PromptSource")
        return
    event("prompts")
    batch = src.next_batch()
    assert len(batch) == 3 and all(0 < len(p.ids) <= 16 for p in batch)
    assert sum(src.skipped.values()) < len(records)


# ----------------------------------------------------------------------------- (c) spec strings


@fuzz(500)
@given(
    st.one_of(
        st.text(max_size=30),
        st.lists(
            st.sampled_from(
                ["a.jsonl", "::", "0.5", "[", "]", ":", "SYS", "nan", "inf", "-1", "x", "/", " "]
            ),
            max_size=8,
        ).map("".join),
    )
)
def test_fuzz_dataset_spec(text):
    try:
        spec = parse_dataset_spec(text, {"SYS": "system text"})
    except DataError as e:
        _one_line_from(e, "dataset spec ")
        event("DataError")
        return
    event("spec")
    assert spec.path and spec.ratio > 0 and math.isfinite(spec.ratio)
    assert isinstance(spec.name, str)


_part = st.text(alphabet="abcdefghij_-", min_size=1, max_size=6)


@fuzz(200)
@given(
    dirs=st.lists(_part, max_size=2),
    stem=_part,
    ext=st.sampled_from([".jsonl", ".json"]),
    ratio=st.none() | st.floats(1e-6, 1e6),
    system=st.none() | st.text("ABC xyz", max_size=8),
    name=st.none() | _part,
)
def test_well_formed_specs_round_trip(dirs, stem, ext, ratio, system, name):
    path = "/".join(dirs + [stem + ext])
    text = (
        path
        + (f"::{ratio!r}" if ratio is not None else "")
        + (f"[{system}]" if system is not None else "")
        + (f":{name}" if name else "")
    )
    spec = parse_dataset_spec(text)
    assert spec.path == path
    assert spec.ratio == (ratio if ratio is not None else 1.0)
    assert spec.system == system
    assert spec.name == (name or stem)
