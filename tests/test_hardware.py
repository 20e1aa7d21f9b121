"""MFU and floor arithmetic of rlhf_pipe.hardware, on numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipe import hardware


def test_role_utilisation_counts_six_for_train_and_two_for_forward():
    busy = {"actor.train": 2.0, "actor.forward": 0.5, "critic.train": 1.0, "rollout": 3.0}
    params = {"actor": 500_000_000, "critic": 100_000_000}
    got = hardware.role_utilisation(busy, params, sequence_tokens=10_000, peak_tflops=100.0)
    # actor.train: 6 * 5e8 * 1e4 / 2 s = 1.5e13 FLOP/s = 15 TFLOP/s, MFU 0.15
    assert got["actor.train"]["tflops"] == pytest.approx(15.0)
    assert got["actor.train"]["mfu"] == pytest.approx(0.15)
    # actor.forward: 2 * 5e8 * 1e4 / 0.5 s = 20 TFLOP/s
    assert got["actor.forward"]["tflops"] == pytest.approx(20.0)
    # critic.train: 6 * 1e8 * 1e4 / 1 s = 6 TFLOP/s
    assert got["critic.train"]["mfu"] == pytest.approx(0.06)
    assert "rollout" not in got  # not a train or forward call


def test_role_utilisation_without_a_peak_has_no_mfu():
    got = hardware.role_utilisation({"actor.train": 1.0}, {"actor": 10}, 100, None)
    assert got["actor.train"]["mfu"] is None and got["actor.train"]["tflops"] > 0


def test_stage_floors():
    # train: 6 * 1e9 params * 1e5 tokens / 600e12 = 1.0 s; generate: 512 steps * 2e9 B / 4e12 B/s
    got = hardware.stage_floors(10**9, 2 * 10**9, 1e5, 512, 600.0, 4000.0)
    assert got["train_floor_s"] == pytest.approx(1.0)
    assert got["generate_floor_s"] == pytest.approx(0.256)
    # the KV cache read on top: + 4e11 B / 4e12 B/s
    with_kv = hardware.stage_floors(10**9, 2 * 10**9, 1e5, 512, 600.0, 4000.0, 4e11)
    assert with_kv["generate_floor_s"] == pytest.approx(0.356)
    assert hardware.stage_floors(1, 1, 1, 1, None, None) == {
        "train_floor_s": None,
        "generate_floor_s": None,
    }


def test_nothing_is_measured_on_a_cpu():
    assert hardware.matmul_tflops(torch.device("cpu")) is None
    assert hardware.hbm_gbps(torch.device("cpu")) is None


def test_model_params_reads_the_tiny_policy(tiny_assets):
    n = hardware.model_params(str(tiny_assets.policy))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_assets.policy))
    assert n == sum(p.numel() for p in model.parameters())
    assert hardware.model_params("/nonexistent") is None


def test_the_bench_times_each_role_call_for_its_mfu():
    from rlhf_pipe.bench import busy_by_role_call

    timeline = [
        ("generate", -1, 0.0, 4.0),
        ("actor.train", 0, 1.0, 2.0),
        ("actor.train", 1, 1.5, 3.0),  # overlaps the one before: counted once
        ("critic.forward", 0, 0.5, 1.0),
        ("train", 0, 1.0, 3.0),
    ]
    assert busy_by_role_call(timeline) == {"actor.train": 2.0, "critic.forward": 0.5}


def test_kv_cache_reads_of_a_generation():
    # InternLM2-1.8B's shape: 24 layers, 8 of 16 heads for keys and values, head size 128.
    config = {"num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8}
    config["hidden_size"] = 2048
    assert hardware.kv_bytes_per_token(config, 2) == 2 * 24 * 8 * 128 * 2  # 96 KiB
    # One sequence, prompt 3, answer 4: its steps read contexts of 3, 4, 5 and 6 tokens.
    assert hardware.decode_kv_reads(1, 3, 4) == 3 + 4 + 5 + 6
    assert hardware.decode_kv_reads(128, 3, 4) == 128 * 18
