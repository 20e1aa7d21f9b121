"""`rlhf-pipe plan` and rlhf_pipe.placement: rank maps of the examples, checks, memory arithmetic.

Pure planning: no GPU, no torch.distributed. The cluster examples point at model folders that
do not exist here; plan loads them with check_paths=False.
"""

from __future__ import annotations

import argparse
import json

import pytest

from rlhf_pipe.config import ConfigError
from rlhf_pipe.placement import (
    ROLES,
    ModelSize,
    activation_gb,
    check,
    errors,
    estimate_memory,
    format_plan,
    make_placement,
    model_size,
    params_from_hf_config,
    train_state_gb,
)
from rlhf_pipe.plan_cli import add_parser, load_for_plan
from rlhf_pipe.validation import load_config
from tests.conftest import ROOT, TINY_CONFIG

EXAMPLES = ROOT / "examples" / "rlhf"
BIG = EXAMPLES / "internlm2_20b_pipe_32gpu.py"
MID = EXAMPLES / "internlm2_1_8b_pipe_8gpu.py"
SMALL = EXAMPLES / "qwen2_0_5b_pipe_4gpu.py"
ONE = EXAMPLES / "qwen2_0_5b_colocate_1gpu.py"


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def plan(path, overrides=None, nnodes=None, gpus_per_node=None):
    return make_placement(load_for_plan(path, overrides), nnodes, gpus_per_node)


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *map(str, argv)])
    return args.fn(args)


def failed(placement, world_size=None):
    return {c.name: c.message for c in check(placement, world_size) if not c.ok}


# ----------------------------------------------------------------------------- the examples

# path, world size, role -> ranks, engine groups
LAYOUTS = [
    (
        BIG,
        32,
        {
            "rollout": range(0, 8),
            "actor": range(8, 16),
            "critic": range(16, 24),
            "reference": range(24, 28),
            "reward": range(28, 32),
        },
        [list(range(8))],
    ),
    (
        MID,
        8,
        {"rollout": [0, 1], "actor": [2, 3], "critic": [4, 5], "reference": [6], "reward": [7]},
        [[0], [1]],
    ),
    (
        SMALL,
        4,
        {"rollout": [0], "actor": [1], "critic": [2], "reward": [2], "reference": [3]},
        [[0]],
    ),
    (ONE, 1, {role: [0] for role in ROLES}, [[0]]),
]


@pytest.mark.parametrize(
    "path, world, ranks, engines", LAYOUTS, ids=lambda v: getattr(v, "stem", None)
)
def test_example_rank_maps(path, world, ranks, engines):
    p = plan(path)
    assert p.world_size == world
    assert {role: p.ranks_of(role) for role in ROLES} == {r: list(v) for r, v in ranks.items()}
    assert p.engines == engines
    for rank in range(world):
        assert p.roles_of(rank) == tuple(r for r in ROLES if rank in ranks[r])
    assert all(c.ok for c in check(p)), failed(p)


def test_32gpu_reference_layout():
    p = plan(BIG, nnodes=4, gpus_per_node=8)
    cfg = p.cfg
    assert (
        cfg.prompt_dataset_config.samples_each_epoch,
        cfg.pipe_micro_batch_num,
        cfg.plan.pipe_micro_bs,
    ) == (128, 4, 32)
    assert (cfg.prompt_dataset_config.max_len, cfg.rollout_config.max_new_tokens) == (1536, 512)
    r = cfg.repeater_config
    assert (r.kl_coeff, r.gamma, r.gae_lambda, r.clip_reward_min, r.clip_reward_max) == (
        0.01,
        1.0,
        0.99,
        -5.0,
        5.0,
    )
    assert cfg.train_config.pretrain_loss_weight == 0.5
    assert {role: s.size for role, s in p.roles.items()} == {
        "rollout": 8,
        "actor": 8,
        "critic": 8,
        "reference": 4,
        "reward": 4,
    }
    assert p.roles["rollout"].engines == 1 and p.roles["rollout"].tp == 8
    assert {role: s.zero_stage for role, s in p.roles.items() if role != "rollout"} == {
        "actor": 3,
        "critic": 3,
        "reference": 3,
        "reward": 3,
    }
    assert p.nnodes == 4
    r27 = p.ranks[27]
    assert (r27.node, r27.local_rank, r27.gpu, r27.roles) == (3, 3, 3, ("reference",))
    assert [c.name for c in check(p)][:2] == ["world size", "total GPUs"]
    assert all(c.ok for c in check(p, world_size=32))


@pytest.mark.parametrize("path", [BIG, MID, SMALL, ONE], ids=lambda v: v.stem)
def test_plan_cli_passes_on_examples(path, capsys):
    assert run_cli(path) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "FAIL" not in out and "WARNING" not in out
    assert out.count("PASS") == 6
    assert "rank map" in out and "memory per GPU" in out


def test_cluster_examples_need_the_skip_to_load():
    with pytest.raises(ConfigError, match="model_configs.policy.model_path: no such folder"):
        load_config(BIG)


def test_32gpu_plan_text(capsys):
    assert run_cli(BIG, "--nnodes", 4, "--gpus-per-node", 8) == 0
    out = capsys.readouterr().out
    assert "  ranks 0-7   node 0  gpus 0-7  rollout (engine 0)" in out
    assert "  ranks 24-27 node 3  gpus 0-3  reference" in out
    assert "PASS  world size: needs 32 GPUs, world size is 32 (nnodes 4 x gpus-per-node 8)" in out


# ----------------------------------------------------------------------------- the world size


def test_mismatched_world_size_is_one_line_exit_2(capsys):
    assert run_cli(BIG, "--nnodes", 2, "--gpus-per-node", 8) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"error: {BIG}: placement: needs 32 GPUs, world size is 16 (nnodes 2 x gpus-per-node 8)"
    ]
    assert "FAIL  world size" in out


def test_world_size_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert run_cli(BIG) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {BIG}: placement: needs 32 GPUs, WORLD_SIZE is 16"
    ]
    monkeypatch.setenv("WORLD_SIZE", "32")
    assert run_cli(BIG) == 0


def test_nnodes_uses_config_gpus_per_node():
    p = plan(SMALL, nnodes=2)  # placement_config.gpus_per_node = 4
    assert failed(p) == {"world size": "needs 4 GPUs, world size is 8 (nnodes 2 x gpus-per-node 4)"}
    assert errors(p, check(p)) == [
        f"{SMALL}: placement: needs 4 GPUs, world size is 8 (nnodes 2 x gpus-per-node 4)"
    ]


def test_total_must_fill_whole_nodes():
    p = plan(BIG, {"model_configs.reference.trainer_config.parallel.data.size": 2})
    assert p.world_size == 30
    assert failed(p)["total GPUs"].startswith(
        "needs 30 GPUs = rollout 8 + actor 8 + critic 8 + "
        "reference 2 + reward 4: not a whole number"
    )
    # 30 GPUs as 5 nodes of 6 is fine, but a TP-8 engine no longer fits on one node.
    p = plan(
        BIG,
        {"model_configs.reference.trainer_config.parallel.data.size": 2},
        nnodes=5,
        gpus_per_node=6,
    )
    assert failed(p) == {
        "tensor parallel": "vLLM TP 8 must divide gpus-per-node 6 "
        "(an engine must not straddle nodes)"
    }


# ----------------------------------------------------------------------------- other checks


def test_tp_must_divide_gpus_per_node_and_engines_stay_on_one_node():
    p = plan(
        MID,
        {
            "model_configs.policy.generator_config.num_engines": 2,
            "model_configs.policy.generator_config.parallel.tensor.size": 4,
        },
        gpus_per_node=4,
    )
    assert p.engines == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(len({p.ranks[r].node for r in group}) == 1 for group in p.engines)
    assert "tensor parallel" not in failed(p)
    p = plan(MID, {"model_configs.policy.generator_config.parallel.tensor.size": 3})
    assert failed(p)["tensor parallel"] == (
        "vLLM TP 3 must divide gpus-per-node 8 (an engine must not straddle nodes)"
    )


def test_dp_size_below_one_fails_even_in_a_config_built_in_code():
    cfg = load_for_plan(BIG)  # load_config rejects 0 itself; a RunConfig built in code may not
    cfg.model_configs.critic.trainer_config.parallel.data["size"] = 0
    assert failed(make_placement(cfg))["dp sizes"] == (
        "model_configs.critic.trainer_config.parallel.data.size: expected an int >= 1, got 0"
    )


def test_bad_zero_stage_is_refused_when_the_config_loads():
    from rlhf_pipe.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"model_configs\.policy\.trainer_config\."
        r"deepspeed_config\.zero_optimization\.stage: expected 2 or 3, got 4$",
    ):
        plan(
            BIG, {"model_configs.policy.trainer_config.deepspeed_config.zero_optimization.stage": 4}
        )


@pytest.mark.parametrize(
    "override, name, message",
    [
        (
            {"model_configs.policy.trainer_config.parallel.data.size": 3},
            "micro-batch split",
            "pipe_micro_bs 32 does not split evenly over actor dp 3",
        ),
        (
            {"train_config.infer_micro_bs": 16},
            "micro-batch split",
            "actor gets 4 samples per rank of each micro-batch (pipe_micro_bs 32 / dp 8), not a "
            "multiple of train_config.infer_micro_bs 16",
        ),
        (
            {"model_configs.critic.trainer_config.parallel.tensor.size": 2},
            "tensor parallel",
            "model_configs.critic.trainer_config.parallel.tensor.size: trainers run data-parallel "
            "only, expected 1, got 2",
        ),
    ],
)
def test_bad_sizes_fail_their_check(override, name, message):
    assert failed(plan(BIG, override)).get(name) == message


def test_roles_of_and_ranks_of_reject_bad_input():
    p = plan(SMALL)
    with pytest.raises(ValueError, match="rank 4 is outside the plan's 4 ranks"):
        p.roles_of(4)
    with pytest.raises(ValueError, match="unknown role 'policy'"):
        p.ranks_of("policy")


# ----------------------------------------------------------------------------- colocation


def test_colocate_actor_ref_spreads_reference_over_actor_ranks():
    p = plan(BIG, {"placement_config.colocate_actor_ref": True})
    assert p.world_size == 28  # the reference's 4 GPUs are gone
    assert p.ranks_of("reference") == [8, 10, 12, 14]  # every 8/4 = 2nd actor rank
    assert p.ranks_of("reward") == [24, 25, 26, 27]
    assert p.roles_of(10) == ("actor", "reference") and p.roles_of(11) == ("actor",)
    assert "colocation" not in failed(p)


def test_colocated_dp_must_divide_host():
    p = plan(
        BIG,
        {
            "placement_config.colocate_actor_ref": True,
            "model_configs.reference.trainer_config.parallel.data.size": 3,
        },
    )
    assert failed(p)["colocation"] == (
        "reference on the actor's ranks: reference size 3 "
        "(model_configs.reference.trainer_config.parallel.data.size) must divide actor dp 8"
    )


def test_colocate_all_needs_rollout_gpus_equal_to_actor_dp():
    p = plan(ONE, {"model_configs.policy.generator_config.num_engines": 2})
    assert "must equal actor dp 1" in failed(p)["colocation"]
    # 2 GPUs, everything on both: engines tile the actor's ranks.
    p = plan(
        ONE,
        {
            "model_configs.policy.generator_config.num_engines": 2,
            "model_configs.policy.trainer_config.parallel.data.size": 2,
            "model_configs.critic.trainer_config.parallel.data.size": 2,
            "placement_config.gpus_per_node": 2,
        },
    )
    assert p.world_size == 2 and p.engines == [[0], [1]]
    assert p.ranks_of("reference") == [0] and p.roles_of(1) == ("rollout", "actor", "critic")
    assert not failed(p)


def test_hf_generator_runs_on_the_actor_ranks():
    p = plan(MID, {"model_configs.policy.generator_config.generator_type": "hf"})
    assert p.world_size == 6  # no vLLM GPUs
    assert p.ranks_of("rollout") == p.ranks_of("actor") == [0, 1]
    assert p.engines == [[0], [1]]
    assert estimate_memory(p).roles["rollout"].total == 0.0  # the actor's own weights
    assert not failed(p)


def test_reward_fn_needs_no_gpu_and_colocation_of_it_is_a_note():
    p = plan(TINY_CONFIG, {"placement_config.colocate_critic_reward": True})
    assert p.ranks_of("reward") == [] and not p.roles["reward"].on_gpu
    assert p.world_size == 4
    assert "colocate_critic_reward: no reward model on a GPU, nothing to colocate" in p.notes
    assert not failed(p)


def test_critic_with_the_actor_takes_a_colocated_reward_along(tiny_assets):
    p = plan(
        TINY_CONFIG,
        {
            "placement_config.colocate_actor_critic": True,
            "placement_config.colocate_critic_reward": True,
            "model_configs.reward.model_path": str(tiny_assets.reward),
        },
    )
    assert p.world_size == 3  # rollout, actor (+ critic + reward), reference
    assert p.roles_of(1) == ("actor", "critic", "reward")
    assert p.roles["critic"].host == "actor" and p.roles["reward"].host == "actor"
    assert not failed(p)


def test_critic_free_config_has_no_critic_role():
    p = plan(
        TINY_CONFIG,
        {
            "model_configs.critic": None,
            "repeater_config.algorithm": "grpo",
            "rollout_config.n": 4,
            "placement_config.colocate_critic_reward": True,
        },
    )
    assert "critic" not in p.roles and p.ranks_of("critic") == []
    assert p.world_size == 3  # rollout, actor, reference
    assert "colocate_critic_reward: no critic model on a GPU, nothing to colocate" in p.notes
    assert not failed(p)


def test_tiny_cpu_config():
    # As written: the torchrun layout, one rank per GPU role (the reward is a function).
    p = plan(TINY_CONFIG)
    assert p.device == "cuda"
    assert [p.roles_of(r) for r in range(4)] == [
        ("rollout",),
        ("actor",),
        ("critic",),
        ("reference",),
    ]
    # device 'cpu' + colocate_all: one CPU process holding every role, no GPU.
    p = plan(TINY_CONFIG, {"placement_config.device": "cpu", "placement_config.colocate_all": True})
    assert p.device == "cpu" and p.world_size == 1
    assert p.roles_of(0) == ("rollout", "actor", "critic", "reference")
    assert p.ranks[0].gpu is None
    m = estimate_memory(p, gpu_mem_gb=0.001)
    assert m.warnings == []  # host RAM is never compared with a GPU
    assert m.roles["rollout"].kv_cache == 0.0  # no vLLM GPU budget on a CPU
    text = format_plan(p, m, check(p))
    assert "needs 1 CPU process on 1 node" in text and "FAIL" not in text


# ----------------------------------------------------------------------------- memory


def test_train_state_partitioning_by_zero_stage():
    # 1e9 params, bf16: weights 2 GB, grads 2 GB, Adam 12 GB; over 8 ranks.
    assert train_state_gb(10**9, None, 8) == (2.0, 2.0, 12.0)
    assert train_state_gb(10**9, 0, 8) == (2.0, 2.0, 12.0)
    assert train_state_gb(10**9, 1, 8) == (2.0, 2.0, 1.5)  # optimizer / 8
    assert train_state_gb(10**9, 2, 8) == (2.0, 0.25, 1.5)  # + grads / 8
    assert train_state_gb(10**9, 3, 8) == (0.25, 0.25, 1.5)  # + weights / 8
    assert train_state_gb(10**9, None, 1, "float32") == (4.0, 4.0, 8.0)


def test_params_from_config_json():
    qwen2_0_5b = dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        intermediate_size=4864,
        vocab_size=151936,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    # embed 151936*896 = 136,134,656; per layer: q,o 2*896*896 + k,v 2*896*128 = 1,835,008,
    # q/k/v bias 896+2*128 = 1,152, MLP 3*896*4864 = 13,074,432, norms 2*896 = 1,792
    # -> 14,912,384 x 24 = 357,897,216; final norm 896; tied head 0.
    assert params_from_hf_config(qwen2_0_5b) == 136_134_656 + 357_897_216 + 896 == 494_032_768
    # A critic/reward: the same trunk, a value head of 896 instead of the (tied) lm_head.
    assert params_from_hf_config(qwen2_0_5b, value_head=True) == 494_032_768 + 896
    llama = dict(
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=256,
        vocab_size=512,
        num_attention_heads=2,
        head_dim=64,
    )
    # embed 65,536 + 2 x (4*128*128 + 3*128*256 + 256) + 128 + lm_head 65,536
    assert params_from_hf_config(llama) == 65_536 + 2 * (65_536 + 98_304 + 256) + 128 + 65_536


def test_model_size_prefers_config_json(tmp_path):
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            dict(
                hidden_size=128,
                num_hidden_layers=2,
                intermediate_size=256,
                vocab_size=512,
                num_attention_heads=2,
            )
        )
    )
    cfg = load_for_plan(SMALL, {"model_configs.policy.model_path": str(folder)})
    size = model_size(cfg, "actor")
    assert size.params == 459_392 and (size.hidden, size.layers, size.vocab) == (128, 2, 512)
    assert size.source == f"{folder}/config.json"
    assert model_size(cfg, "critic") == ModelSize(494_000_000, "CRITIC_PARAMS_B")


def test_activation_allowance():
    size = ModelSize(10**6, "test", hidden=128, layers=2, vocab=512)
    # s = 60 tokens, train b = 4, no checkpointing: stored 34*4*60*128*2 = 2,088,960
    # + actor logits 8*4*60*512 = 983,040 -> 3,072,000 bytes (more than the forward figure)
    assert activation_gb(size, 60, 4, 4, True, False, True) == pytest.approx(3_072_000 / 1e9)
    # checkpointing: 2*4*60*128*2 + 34*4*60*128 = 122,880 + 1,044,480; + logits 983,040
    # = 2,150,400 (more than the forward figure, 1,536,000, below)
    assert activation_gb(size, 60, 4, 4, True, True, True) == pytest.approx(2_150_400 / 1e9)
    # forward only (reference, b = 4): 1,044,480 + 491,520
    assert activation_gb(size, 60, 4, 4, False, False, True) == pytest.approx(1_536_000 / 1e9)
    assert activation_gb(ModelSize(10**9, "X_PARAMS_B"), 60, 4, 4, True, True, True) == 4.0


def test_32gpu_memory_estimate():
    m = estimate_memory(plan(BIG), gpu_mem_gb=80)
    P = 19.86e9
    # actor: ZeRO-3 over 8: (2 + 2 + 12) * P / 8 bytes, + flat 4 GB activation allowance
    assert m.roles["actor"].total == pytest.approx(16 * P / 8 / 1e9 + 4.0)
    # reference: forward only, ZeRO-3 over 4: 2 * P / 4, + flat 1 GB
    assert m.roles["reference"].total == pytest.approx(2 * P / 4 / 1e9 + 1.0)
    # rollout: weights 2 * P / TP 8 within the vLLM budget 0.85 x 80 = 68 GB
    assert m.roles["rollout"].weights == pytest.approx(2 * P / 8 / 1e9)
    assert m.roles["rollout"].total == pytest.approx(68.0)
    assert m.roles["rollout"].kv_cache == pytest.approx(68.0 - 2 * P / 8 / 1e9)
    assert m.per_rank[0] == pytest.approx(68.0) and m.per_rank[8] == m.roles["actor"].total
    assert m.warnings == []


def test_memory_over_limit_warns_but_passes(capsys):
    assert run_cli(BIG, "--gpu-mem-gb", 40) == 0
    out = capsys.readouterr().out
    assert "WARNING actor: ~43.72 GB per GPU exceeds --gpu-mem-gb 40" in out
    m = estimate_memory(plan(BIG, {"rollout_config.gpu_memory_utilization": 0.05}), 80)
    assert any(
        "exceed the vLLM budget 0.05 x 80 = 4.00 GB: no room for the KV cache" in w
        for w in m.warnings
    )


def test_colocated_memory_sums_roles_and_offload_counts_ref_or_reward_once():
    with_offload = estimate_memory(plan(ONE), 80)
    without = estimate_memory(plan(ONE, {"placement_config.ref_reward_offload": False}), 80)
    roles = without.roles
    assert without.per_rank[0] == pytest.approx(sum(r.total for r in roles.values()))
    assert with_offload.per_rank[0] == pytest.approx(
        without.per_rank[0] - min(roles["reference"].total, roles["reward"].total)
    )
    # over the limit on a shared GPU: the rank is named
    tight = estimate_memory(plan(ONE), 30)  # 0.35 x 30 for vLLM + ~25.8 GB for the rest
    assert any(w.startswith("rank 0 (colocated roles): up to ~") for w in tight.warnings)


def test_zero_offload_is_read_and_leaves_the_gpu_estimate():
    key = "model_configs.policy.trainer_config.deepspeed_config.zero_optimization"
    base = estimate_memory(plan(BIG), 80).roles["actor"]
    p = plan(
        BIG,
        {f"{key}.offload_optimizer": {"device": "cpu"}, f"{key}.offload_param": {"device": "cpu"}},
    )
    assert p.roles["actor"].offload == ("optimizer", "param")
    assert p.roles["actor"].parallel_text() == "dp 8, ZeRO-3 (optimizer + param on CPU)"
    off = estimate_memory(p, 80).roles["actor"]
    # ZeRO-3 over 8 keeps only the 2-byte gradient partition (and activations) on the GPU.
    assert (off.weights, off.optim, off.grads) == (0.0, 0.0, base.grads)
    assert off.total == pytest.approx(base.total - base.weights - base.optim)


# ----------------------------------------------------------------------------- GPU maps


def test_local_rank_gpus_put_ranks_on_shared_gpus_with_a_note():
    p = plan(TINY_CONFIG, {"placement_config.local_rank_gpus": [0, 1, 1, 1]})
    assert [rp.gpu for rp in p.ranks] == [0, 1, 1, 1]
    checks = {c.name: c for c in check(p)}
    assert checks["gpu map"].ok and "3->1" in checks["gpu map"].message
    assert "2 GPUs per node" in checks["total GPUs"].message
    shared = [n for n in p.notes if "GPU 1 is shared by ranks 1-3" in n]
    assert shared and "actor, critic, reference" in shared[0]
    text = format_plan(p, estimate_memory(p), check(p))
    assert "rank  3     node 0  gpu  1" in text
    # One process per GPU: no note.
    assert not [n for n in plan(TINY_CONFIG).notes if "shared by" in n]


def test_bad_local_rank_gpus_fail_the_gpu_map_check():
    for bad in ([0, 1], [0, 1, 1, -1], [0, 1, 1, "1"]):
        p = plan(TINY_CONFIG, {"placement_config.local_rank_gpus": bad})
        msg = failed(p)["gpu map"]
        assert msg.startswith("placement_config.local_rank_gpus: expected 4 GPU indices"), msg


def test_ranks_sharing_a_gpu_add_up_in_the_memory_estimate():
    p = plan(TINY_CONFIG, {"placement_config.local_rank_gpus": [0, 1, 1, 1]})
    memory = estimate_memory(p, gpu_mem_gb=1e-3)  # tiny models, a tinier GPU
    assert any(
        w.startswith("node 0 GPU 1 (ranks 1-3, separate processes)") for w in memory.warnings
    ), memory.warnings
    # The peak line sums them too (vLLM's budget on GPU 0 shrinks with the tinier GPU).
    text = format_plan(p, memory, check(p))
    assert f"peak per GPU: ~{sum(memory.per_rank[1:]):.2f} GB on node 0 GPU 1 (ranks 1-3)" in text
