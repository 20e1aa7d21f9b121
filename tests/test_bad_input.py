"""Bad input: every bad config and data file is one exact, one-line error; skipped prompts are
counted; `trust_remote_code` stays off unless a config turns it on.

Config cases are dotted overrides on the tiny example (message prefixed with its path) or whole
small config files; data cases are small files read through `PromptSource`. "{tmp}" in a case
stands for the test's tmp_path.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

from rlhf_pipe.config import SECTIONS, ConfigError, PlacementConfig
from rlhf_pipe.data import DataError, PromptSource, parse_dataset_spec
from rlhf_pipe.models import ModelLoadError, check_tokenizer_matches, load_tokenizer
from rlhf_pipe.validation import load_config
from tests.conftest import ROOT, TINY_CONFIG, tiny_config

# The "(known: ...)" lists of sections that grow with the schema; the rest is spelled out.
SECTION_NAMES = ", ".join(sorted(SECTIONS))
PLACEMENT_KEYS = ", ".join(sorted(f.name for f in dataclasses.fields(PlacementConfig)))


def _fill(value, tmp):
    """Replace "{tmp}" inside strings, lists and dicts."""
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- configs: overrides

BAD_OVERRIDES = [
    # unknown keys, at three depths
    (
        "unknown_section",
        {"rollout_confg": {}},
        f"rollout_confg: unknown key (known: {SECTION_NAMES})",
    ),
    (
        "unknown_nested_key",
        {"tokenizer_config.tokenizer_pth": "x"},
        "tokenizer_config.tokenizer_pth: unknown key (known: padding_side, tokenizer_path, "
        "trust_remote_code)",
    ),
    (
        "unknown_deep_key",
        {"model_configs.policy.trainer_config.parallel.pipe": {}},
        "model_configs.policy.trainer_config.parallel.pipe: unknown key (known: data, tensor)",
    ),
    (
        "int_key",
        {"placement_config": {1: 2}},
        f"placement_config.1: unknown key (known: {PLACEMENT_KEYS})",
    ),
    (
        "key_with_line_break",
        {"placement_config": {"gpus\nper_node": 8}},
        f"placement_config.'gpus\\nper_node': unknown key (known: {PLACEMENT_KEYS})",
    ),
    # wrong types, at several depths
    ("section_not_dict", {"rollout_config": [1, 2]}, "rollout_config: expected a dict, got [1, 2]"),
    (
        "str_for_int",
        {"train_config.max_train_step": "ten"},
        "train_config.max_train_step: expected int, got 'ten'",
    ),
    (
        "str_for_float_depth3",
        {"model_configs.policy.trainer_config.lr": "high"},
        "model_configs.policy.trainer_config.lr: expected float, got 'high'",
    ),
    (
        "int_for_dict_depth4",
        {"model_configs.policy.trainer_config.parallel.data": 3},
        "model_configs.policy.trainer_config.parallel.data: expected dict, got 3",
    ),
    (
        "bool_for_int",
        {"train_config.ppo_epochs": True},
        "train_config.ppo_epochs: expected int, got True",
    ),
    (
        "bool_for_float",
        {"rollout_config.temperature": True},
        "rollout_config.temperature: expected float, got True",
    ),
    (
        "str_for_bool",
        {"model_configs.policy.trust_remote_code": "yes"},
        "model_configs.policy.trust_remote_code: expected bool, got 'yes'",
    ),
    (
        "str_for_list",
        {"prompt_dataset_config.message_datasets": "a.jsonl"},
        "prompt_dataset_config.message_datasets: expected list, got 'a.jsonl'",
    ),
    # impossible sizes and ranges
    (
        "zero_steps",
        {"train_config.max_train_step": 0},
        "train_config.max_train_step: expected a value >= 1, got 0",
    ),
    (
        "negative_tokens",
        {"rollout_config.max_new_tokens": -1},
        "rollout_config.max_new_tokens: expected a value >= 1, got -1",
    ),
    (
        "zero_samples",
        {"prompt_dataset_config.samples_each_epoch": 0},
        "prompt_dataset_config.samples_each_epoch: expected a value >= 1, got 0",
    ),
    (
        "top_p_zero",
        {"rollout_config.top_p": 0.0},
        "rollout_config.top_p: expected a value > 0.0, got 0.0",
    ),
    (
        "gamma_above_one",
        {"repeater_config.gamma": 1.5},
        "repeater_config.gamma: expected a value <= 1.0, got 1.5",
    ),
    (
        "nan_lr",
        {"model_configs.policy.trainer_config.lr": float("nan")},
        "model_configs.policy.trainer_config.lr: expected a value >= 0.0, got nan",
    ),
    (
        "zero_parallel_size",
        {"model_configs.critic.trainer_config.parallel.data.size": 0},
        "model_configs.critic.trainer_config.parallel.data.size: expected an int >= 1, got 0",
    ),
    # batch sizes that do not divide
    (
        "pipe_indivisible",
        {"PIPE_MICRO_BATCH_NUM": 3},
        "PIPE_MICRO_BATCH_NUM: samples per step (16 prompts x n=1 = 16) must be divisible by "
        "PIPE_MICRO_BATCH_NUM=3",
    ),
    (
        "pipe_indivisible_n2",
        {"PIPE_MICRO_BATCH_NUM": 3, "rollout_config.n": 2},
        "PIPE_MICRO_BATCH_NUM: samples per step (16 prompts x n=2 = 32) must be divisible by "
        "PIPE_MICRO_BATCH_NUM=3",
    ),
    ("pipe_zero", {"PIPE_MICRO_BATCH_NUM": 0}, "PIPE_MICRO_BATCH_NUM: expected an int >= 1, got 0"),
    (
        "pipe_str",
        {"PIPE_MICRO_BATCH_NUM": "4"},
        "PIPE_MICRO_BATCH_NUM: expected an int >= 1, got '4'",
    ),
    (
        "pipe_micro_bs_mismatch",
        {"train_config.pipe_micro_bs": 8},
        "train_config.pipe_micro_bs: expected samples per step / PIPE_MICRO_BATCH_NUM = 16/4 = 4, "
        "got 8",
    ),
    (
        "train_micro_bs_not_dividing",
        {"train_config.train_micro_bs": 3},
        "train_config.train_micro_bs: must divide pipe_micro_bs=4 (so micro-batch chunks are the "
        "same in pipelined and serial runs), got 3",
    ),
    (
        "infer_micro_bs_not_dividing",
        {"train_config.infer_micro_bs": 8},
        "train_config.infer_micro_bs: must divide pipe_micro_bs=4 (so micro-batch chunks are the "
        "same in pipelined and serial runs), got 8",
    ),
    (
        "num_mini_batches_not_dividing",
        {"train_config.num_mini_batches": 3},
        "train_config.num_mini_batches: must divide samples per step (16), got 3",
    ),
    (
        "mini_batch_below_train_micro_bs",
        {"train_config.num_mini_batches": 8},
        "train_config.train_micro_bs: must divide the mini-batch size 2, got 4",
    ),
    # models
    (
        "missing_policy_path",
        {"model_configs.policy.model_path": None},
        "model_configs.policy.model_path: required key is missing",
    ),
    (
        "missing_model_folder",
        {"model_configs.critic.model_path": "{tmp}/no_such_critic"},
        "model_configs.critic.model_path: no such folder: {tmp}/no_such_critic",
    ),
    (
        "model_folder_without_weights",
        {"model_configs.policy.model_path": "{tmp}/empty_model"},
        "model_configs.policy.model_path: no weights (*.safetensors or *.bin) in {tmp}/empty_model",
    ),
    (
        "missing_tokenizer_folder",
        {"tokenizer_config.tokenizer_path": "{tmp}/no_such_tok"},
        "tokenizer_config.tokenizer_path: no such folder: {tmp}/no_such_tok",
    ),
    (
        "missing_reward",
        {"model_configs.reward": None},
        "model_configs.reward: expected a model_path, a reward_fn or both",
    ),
    (
        "reward_without_path_or_fn",
        {"model_configs.reward.reward_fn": None},
        "model_configs.reward: expected a model_path, a reward_fn or both",
    ),
    (
        "reward_fn_without_colon",
        {"model_configs.reward.reward_fn": "digit_reward"},
        "model_configs.reward.reward_fn: expected 'module:function', got 'digit_reward'",
    ),
    (
        "no_reference_with_kl",
        {"model_configs.reference": None},
        "model_configs.reference: required when repeater_config.kl_coeff > 0 (got 0.01)",
    ),
    (
        "betas_wrong_length",
        {"model_configs.policy.trainer_config.betas": [0.9]},
        "model_configs.policy.trainer_config.betas: expected two floats, got [0.9]",
    ),
    (
        "betas_wrong_types",
        {"model_configs.critic.trainer_config.betas": ["a", "b"]},
        "model_configs.critic.trainer_config.betas: expected two floats, got ['a', 'b']",
    ),
    # lengths and rewards
    (
        "max_model_len_not_above_new_tokens",
        {"rollout_config.max_model_len": 12},
        "rollout_config.max_model_len: must exceed max_new_tokens=12, got 12",
    ),
    (
        "clip_reward_min_not_below_max",
        {"repeater_config.clip_reward_min": 5.0},
        "repeater_config.clip_reward_min: must be below clip_reward_max=5.0, got 5.0",
    ),
    # Literal values, including inside an optional section
    (
        "bad_kl_estimator",
        {"repeater_config.kl_estimator": "k4"},
        "repeater_config.kl_estimator: expected 'k1' or 'k2' or 'k3' or 'abs', got 'k4'",
    ),
    (
        "bad_norm_rewards",
        {"repeater_config.norm_rewards": "whole"},
        "repeater_config.norm_rewards: expected 'running' or 'batch' or bool, got 'whole'",
    ),
    (
        "bad_padding_side",
        {"tokenizer_config.padding_side": "right"},
        "tokenizer_config.padding_side: expected 'left', got 'right'",
    ),
    (
        "bad_dtype",
        {"model_configs.policy.trainer_config.torch_dtype": "fp16"},
        "model_configs.policy.trainer_config.torch_dtype: expected 'float32' or 'bfloat16' or "
        "'float16', got 'fp16'",
    ),
    (
        "bad_generator_type",
        {"model_configs.policy.generator_config.generator_type": "sglang"},
        "model_configs.policy.generator_config.generator_type: expected 'vllm' or 'hf', "
        "got 'sglang'",
    ),
    # datasets
    (
        "no_datasets",
        {"prompt_dataset_config.message_datasets": []},
        "prompt_dataset_config.message_datasets: expected at least one dataset",
    ),
    (
        "dataset_not_a_string",
        {"prompt_dataset_config.message_datasets": [5]},
        "prompt_dataset_config.message_datasets[0]: expected a 'path::ratio[SYS]:name' string, "
        "got 5",
    ),
    (
        "dataset_ratio_zero",
        {"prompt_dataset_config.message_datasets": ["{tmp}/a.jsonl::0"]},
        "prompt_dataset_config.message_datasets[0]: dataset spec '{tmp}/a.jsonl::0': ratio must be "
        "> 0, got 0.0",
    ),
]


@pytest.mark.parametrize(
    "overrides, message", [c[1:] for c in BAD_OVERRIDES], ids=[c[0] for c in BAD_OVERRIDES]
)
def test_bad_config_override(tmp_path, overrides, message):
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, **_fill(overrides, tmp_path))
    assert str(err.value) == f"{TINY_CONFIG}: " + _fill(message, tmp_path)


# ----------------------------------------------------------------------------- configs: whole files

_MODELS = "model_configs = dict(policy=dict(model_path='/nowhere'))\n"
_PROMPTS = "prompt_dataset_config = dict(samples_each_epoch=4, message_datasets=['a.jsonl'])\n"

BAD_FILES = [
    ("syntax_error.py", "x = 1\ny = (\nz = 3\n", "{path}:2: syntax error: '(' was never closed"),
    (
        "raises.py",
        "x = 1\nraise RuntimeError('boom\\nmore')\n",
        "{path}: failed to load: RuntimeError: boom",
    ),
    (
        "bad_import.py",
        "import no_such_module_xyz\n",
        "{path}: failed to load: ModuleNotFoundError: No module named 'no_such_module_xyz'",
    ),
    ("exits.py", "import sys\nsys.exit(3)\n", "{path}: failed to load: SystemExit: 3"),
    (
        "nul_byte.py",
        b"x = 1\x00\n",
        "{path}: syntax error: source code string cannot contain null bytes",
    ),
    (
        "latin1.py",
        b"x = '\xe9'\n",
        "{path}:1: syntax error: (unicode error) 'utf-8' codec can't decode byte 0xe9 in position "
        "0: unexpected end of data",
    ),
    (
        "config.yaml",
        "train_config:\n  seed: 1\n",
        "{path}: expected a Python config file ending in .py",
    ),
    ("empty.py", "", "{path}: model_configs: required section is missing"),
    ("no_prompts.py", _MODELS, "{path}: prompt_dataset_config: required section is missing"),
    (
        "no_policy.py",
        "model_configs = dict(critic=dict(model_path='/nowhere'))\n" + _PROMPTS,
        "{path}: model_configs.policy: required key is missing",
    ),
    (
        "no_datasets.py",
        _MODELS + "prompt_dataset_config = dict(samples_each_epoch=4)\n",
        "{path}: prompt_dataset_config.message_datasets: expected at least one dataset",
    ),
    (
        "no_samples.py",
        _MODELS + "prompt_dataset_config = dict(message_datasets=['a.jsonl'])\n",
        "{path}: prompt_dataset_config.samples_each_epoch: required, expected an int >= 1",
    ),
    (
        "lowercase_helper.py",
        "helper = 3\n" + _MODELS + _PROMPTS,
        f"{{path}}: helper: unknown key (known: {SECTION_NAMES})",
    ),
]


@pytest.mark.parametrize("name, text, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_config_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == message.format(path=path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.py")
    assert str(err.value) == f"{tmp_path / 'nope.py'}: no such config file"


def test_private_names_and_constants_are_not_keys(tmp_path):
    path = tmp_path / "ok.py"
    path.write_text(TINY_CONFIG.read_text() + "\n_helper = 3\nMY_CONSTANT = 'x'\n")
    cfg = load_config(path, {"train_config.work_dir": str(tmp_path / "run")})
    assert cfg.constants["MY_CONSTANT"] == "x"
    assert "_helper" not in cfg.constants


# ----------------------------------------------------------------------------- tokenizer vs model


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return load_tokenizer(str(tiny_assets.policy))


def test_tokenizer_larger_than_model_vocab(tmp_path, tiny_assets, tokenizer):
    check_tokenizer_matches(str(tiny_assets.policy), str(tiny_assets.policy), "policy")
    folder = tmp_path / "policy"
    shutil.copytree(tiny_assets.policy, folder)
    tok = load_tokenizer(str(tiny_assets.policy))
    assert tok.add_tokens(["<extra_0>", "<extra_1>", "<extra_2>"]) == 3
    tok.save_pretrained(folder)
    with pytest.raises(ModelLoadError) as err:
        check_tokenizer_matches(str(folder), str(folder), "policy")
    assert str(err.value) == (
        f"policy: the tokenizer in {folder} has 515 tokens but the model in "
        f"{folder} has a vocabulary of 512 (vocab_size in config.json)"
    )
    with pytest.raises(ModelLoadError) as err:
        check_tokenizer_matches(str(tiny_assets.policy), str(tmp_path / "none"), "reference")
    assert str(err.value) == f"reference: tokenizer folder not found: {tmp_path / 'none'}"


# ----------------------------------------------------------------------------- trust_remote_code


@pytest.mark.parametrize("turn_on", [False, True])
def test_trust_remote_code_off_unless_configured(tmp_path, monkeypatch, turn_on):
    import transformers

    from rlhf_pipe.trainer import RLHFTrainer

    assert "trust_remote_code" not in TINY_CONFIG.read_text()
    overrides = {"model_configs.policy.generator_config.generator_type": "hf"}
    if turn_on:
        overrides["model_configs.policy.trust_remote_code"] = True
    cfg = tiny_config(tmp_path, **overrides)
    mc = cfg.model_configs
    roles = [mc.policy, mc.critic, mc.reference, mc.reward]
    assert [m.trust_remote_code for m in roles] == [turn_on, False, False, False]
    assert cfg.tokenizer_config.trust_remote_code is False

    calls = []
    for cls in (
        transformers.AutoTokenizer,
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForSequenceClassification,
    ):

        def spy(klass, *args, _orig=cls.from_pretrained.__func__, **kwargs):
            calls.append((klass.__name__, kwargs.get("trust_remote_code", "not passed")))
            return _orig(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    RLHFTrainer(cfg, console=False).close()
    # tokenizer, policy, critic, reference (the reward is a function here)
    assert calls == [
        ("AutoTokenizer", False),
        ("AutoModelForCausalLM", turn_on),
        ("AutoModelForSequenceClassification", False),
        ("AutoModelForCausalLM", False),
    ]


# ----------------------------------------------------------------------------- data files


def _long(n=1):
    return "".join(json.dumps({"prompt": "digits " * 100}) + "\n" for _ in range(n))


def _corrupt_parquet_message(path):
    return (
        f"{path}: not a readable Parquet file: Could not open Parquet input source '{path}': "
        "Parquet file size is 15 bytes, smaller than the size reported by footer's "
        "(1701273954bytes)"
    )


BAD_DATA = [
    ("empty.jsonl", "", "{path}: the file holds no records"),
    ("blank.jsonl", "  \n\n\t \n", "{path}: the file holds no records"),
    (
        "malformed3.jsonl",
        '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n',
        "{path}:3: malformed JSON: Expecting value",
    ),
    (
        "utf8_line2.jsonl",
        b'{"prompt": "a"}\n{"prompt": "\xc3\x28"}\n',
        "{path}:2: invalid UTF-8 at byte 12",
    ),
    (
        "utf8_line3.json",
        b'[\n{"prompt": "a"},\n{"prompt": "\xff"}\n]',
        "{path}:3: invalid UTF-8 at byte 31",
    ),
    (
        "malformed3.json",
        '[\n{"prompt": "a"},\n{"prompt": }\n]',
        "{path}:3: malformed JSON: Expecting value",
    ),
    ("deep.jsonl", "[" * 100_000 + "\n", "{path}:1: malformed JSON: nested too deeply"),
    ("dict.json", '{"prompt": "a"}', "{path}: expected a JSON list of records, got dict"),
    ("non_object.json", '[{"prompt": "a"}, 5]', "{path}:2: expected a JSON object, got int"),
    ("list_line.jsonl", "[1, 2]\n", "{path}:1: expected a JSON object, got list"),
    ("missing_field.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', "{path}:2: missing field 'prompt'"),
    (
        "int_prompt.jsonl",
        '{"prompt": 5}\n',
        "{path}:1: field 'prompt' must be a string or a list of chat messages",
    ),
    (
        "int_content.jsonl",
        '{"prompt": [{"role": "user", "content": 5}]}\n',
        "{path}:1: field 'prompt' must be a string or a list of chat messages",
    ),
    (
        "lone_surrogate.jsonl",
        '{"prompt": "ok"}\n{"prompt": "\\ud800 hi"}\n',
        "{path}:2: field 'prompt' holds a lone surrogate (a bad \\u escape)",
    ),
    (
        "all_empty.jsonl",
        '{"prompt": ""}\n{"prompt": "  "}\n{"prompt": []}\n',
        "{path}: no usable prompt (empty: 3, longer than 16 tokens: 0)",
    ),
    ("all_long.jsonl", _long(2), "{path}: no usable prompt (empty: 0, longer than 16 tokens: 2)"),
    ("corrupt.parquet", b"PAR1garbagePAR1", _corrupt_parquet_message("{path}")),
    ("prompts.txt", '{"prompt": "a"}\nnot json\n', "{path}:2: malformed JSON: Expecting value"),
]


@pytest.mark.parametrize("name, content, message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_file(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as err:
        PromptSource([parse_dataset_spec(str(path))], tokenizer, batch_size=2, max_len=16)
    assert str(err.value) == message.format(path=path)


def test_missing_data_file(tmp_path, tokenizer):
    with pytest.raises(DataError) as err:
        PromptSource([parse_dataset_spec(str(tmp_path / "nope.jsonl"))], tokenizer, 2, 16)
    assert str(err.value) == f"{tmp_path / 'nope.jsonl'}: no such data file"


def test_skipped_prompts_are_counted_per_file(tmp_path, tokenizer):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"prompt": " "}) + "\n" + json.dumps({"prompt": "ok"}) + "\n" + _long())
    src = PromptSource([parse_dataset_spec(str(a))], tokenizer, batch_size=2, max_len=16)
    assert src.skipped == {"empty": 1, "too_long": 1, "too_short": 0}
    assert [p.text for p in src.next_batch()] == ["ok", "ok"]
    # The failing file's message counts its own prompts, not those skipped in earlier files.
    b = tmp_path / "b.jsonl"
    b.write_text(_long(3))
    with pytest.raises(DataError) as err:
        PromptSource([parse_dataset_spec(str(a)), parse_dataset_spec(str(b))], tokenizer, 2, 16)
    assert str(err.value) == f"{b}: no usable prompt (empty: 0, longer than 16 tokens: 3)"


# ----------------------------------------------------------------------------- the command line


def _train(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_pipe", "train", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return proc, errors


def test_cli_config_file_that_raises(tmp_path):
    cfg = tmp_path / "raises.py"
    cfg.write_text("PIPE_MICRO_BATCH_NUM = 4\nraise KeyError('no such dataset')\n")
    proc, errors = _train(cfg)
    assert proc.returncode == 2
    assert errors == [f"error: {cfg}: failed to load: KeyError: 'no such dataset'"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_model_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    proc, errors = _train(
        TINY_CONFIG, "--set", f"model_configs.critic.model_path='{tmp_path}/empty'"
    )
    assert proc.returncode == 2
    assert errors == [
        f"error: {TINY_CONFIG}: model_configs.critic.model_path: no weights "
        f"(*.safetensors or *.bin) in {tmp_path}/empty"
    ]
    assert "Traceback" not in proc.stderr


def test_cli_bad_data_file(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a"}\n{"prompt": \n')
    proc, errors = _train(
        TINY_CONFIG,
        "--work-dir",
        tmp_path / "run",
        "--set",
        f"prompt_dataset_config.message_datasets=['{data}']",
        "--set",
        "model_configs.policy.generator_config.generator_type='hf'",
        "--set",
        "train_config.tensorboard=False",
    )
    assert proc.returncode == 2
    assert errors == [f"error: {data}:2: malformed JSON: Expecting value"]
    assert "Traceback" not in proc.stderr


_DS = "model_configs.{}.trainer_config.deepspeed_config"


@pytest.mark.parametrize(
    "role, ds, key, message",
    [
        (
            "policy",
            {"zero_optimization": {"stage": 1}},
            "zero_optimization.stage",
            "expected 2 or 3, got 1",
        ),
        (
            "reference",
            {"zero_optimization": {"stage": 2}},
            "zero_optimization.stage",
            "expected 3: a forward-only model has no gradients or optimizer state to partition, "
            "only weights (ZeRO-3), got 2",
        ),
        (
            "critic",
            {"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}},
            "optimizer",
            "set by rlhf_pipe (lr, betas, eps, weight_decay, lr_warmup_steps from "
            "trainer_config; batch sizes from train_config): remove it",
        ),
        (
            "policy",
            {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
            "bf16.enabled",
            "is True, but trainer_config.torch_dtype is 'float32': set both to bf16 or neither",
        ),
        (
            "policy",
            {"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}},
            "fp16.enabled",
            "fp16 needs dynamic loss scaling, which the batch normaliser (carried as "
            "the loss scale) excludes: use bf16",
        ),
        (
            "critic",
            {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5},
            "gradient_clipping",
            "0.5 differs from trainer_config.max_grad_norm=1.0: give it once, in max_grad_norm",
        ),
    ],
)
def test_deepspeed_config_it_cannot_honour_is_one_line(tmp_path, role, ds, key, message):
    from rlhf_pipe.config import ConfigError

    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, **{_DS.format(role): ds})
    assert str(err.value) == f"{TINY_CONFIG}: {_DS.format(role)}.{key}: {message}"


def test_deepspeed_config_of_a_reward_function_is_refused(tmp_path):
    from rlhf_pipe.config import ConfigError

    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, **{_DS.format("reward"): {"zero_optimization": {"stage": 3}}})
    assert str(err.value) == (
        f"{TINY_CONFIG}: {_DS.format('reward')}: set, but there is no "
        "model_path (a reward_fn runs no model)"
    )


def test_zero3_actor_with_the_hf_generator_is_refused(tmp_path):
    from rlhf_pipe.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"generator_config\.generator_type: 'hf' generates "
        r"with a copy of the actor's module, which ZeRO-3 partitions",
    ):
        tiny_config(
            tmp_path,
            **{
                _DS.format("policy"): {"zero_optimization": {"stage": 3}},
                "model_configs.policy.generator_config.generator_type": "hf",
            },
        )


def test_cli_hf_generator_with_stop_strings_is_refused_at_start(tmp_path):
    # issue 17: it used to start, then fail inside the Generate stage with a traceback.
    proc, errors = _train(
        TINY_CONFIG,
        "--work-dir",
        tmp_path / "run",
        "--set",
        "model_configs.policy.generator_config.generator_type='hf'",
        "--set",
        "rollout_config.stop_token_list='\\n;.'",
    )
    assert proc.returncode == 2
    assert errors == [
        f"error: {TINY_CONFIG}: rollout_config.stop_token_list: needs the vllm generator "
        "(model_configs.policy.generator_config.generator_type='vllm'); the hf generator "
        "has no stop strings"
    ]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
