"""Checkpoints resume into another optimizer layout (plain AdamW <-> ZeRO-2/3) by parameter
name (rlhf_pipe/optim_state.py): the Adam moments arrive unchanged, and training goes on as
an uninterrupted run of the new layout does, up to ZeRO's order of float sums."""

import pytest
import torch

from rlhf_pipe import optim_state
from rlhf_pipe.checkpoint import STATE_FILE, CheckpointError
from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import tiny_config
from tests.test_zero import TOL, _both, _ds, _max_diff, _weights

pytestmark = pytest.mark.slow


def _run(tmp_path, engine, initial, steps, resume=None, **over):
    engine.load_weights(initial.items(), version=0)
    trainer = RLHFTrainer(tiny_config(tmp_path, **over), engine=engine, console=False)
    if resume is not None:
        trainer.resume(resume)
        moments = _moments(trainer.actor)  # as loaded, before any further step
    trainer.learn(steps)
    trainer.close()
    return trainer, (moments if resume is not None else _moments(trainer.actor))


def _moments(role) -> dict:
    """name -> full fp32 exp_avg of the role's live optimizer (ZeRO: gathered)."""
    params = dict(role.model.named_parameters())
    if getattr(role, "zero", None) is not None:
        from deepspeed.utils import safe_get_full_optimizer_state

        return {
            n: safe_get_full_optimizer_state(params[n], "exp_avg").clone()
            for n in optim_state.trained_names(role.model)
        }
    return {
        n: role.optimizer.state[params[n]]["exp_avg"].float().clone()
        for n in optim_state.trained_names(role.model)
    }


def _ckpt(tmp_path, step):
    return tmp_path / "run" / "checkpoints" / f"step_{step:06d}"


def test_zero2_to_plain_and_plain_to_zero3(tmp_path, vllm_engine, initial_policy_weights):
    run = lambda name, steps, **kw: _run(
        tmp_path / name,
        vllm_engine,  # noqa: E731
        initial_policy_weights,
        steps,
        **kw,
    )
    # ZeRO-2 for 2 steps, then plain AdamW from its checkpoint for a third step.
    z2, z2_moments = run("z2", 2, **_both(_ds(2)))
    plain, _ = run("plain", 3, **{"train_config.save_interval": 1})
    resumed, loaded = run("z2_to_plain", 3, resume=_ckpt(tmp_path / "z2", 2))
    assert loaded.keys() == z2_moments.keys()
    assert all(torch.equal(loaded[n], z2_moments[n]) for n in loaded)  # moments restored
    assert max(v.abs().max().item() for v in loaded.values()) > 0  # and they are not zeros
    assert resumed.step_index == 3
    for part in ("actor", "critic"):
        # Steps 1-2 ran under ZeRO, which sums in another order (tests/pipeline/test_zero.py).
        diff = _max_diff(_weights(plain)[part], _weights(resumed)[part])
        print(
            f"ZeRO-2 step 2 -> plain step 3 vs plain step 3: {part} max |difference| = {diff:.3g}"
        )
        assert diff <= TOL, (part, diff)

    # Plain for 2 steps, then ZeRO-3 from its checkpoint for a third step.
    z3, _ = run("z3", 3, **_both(_ds(3)))
    saved = torch.load(_ckpt(tmp_path / "plain", 2) / STATE_FILE, weights_only=False)
    to_z3, loaded = run("plain_to_z3", 3, resume=_ckpt(tmp_path / "plain", 2), **_both(_ds(3)))
    assert all(torch.equal(loaded[n], saved["actor"]["params"][n]["exp_avg"]) for n in loaded)
    for part in ("actor", "critic"):
        diff = _max_diff(_weights(z3)[part], _weights(to_z3)[part])
        print(
            f"plain step 2 -> ZeRO-3 step 3 vs ZeRO-3 step 3: {part} max |difference| = {diff:.3g}"
        )
        assert diff <= TOL, (part, diff)

    # The per-rank format written before still loads where it did, and nowhere else.
    legacy = {
        "zero": z2.actor.zero.state_dict(),
        "scheduler": z2.actor.scheduler.state_dict(),
        "zero_stage": 2,
        "dp_size": 1,
        "dp_rank": 0,
    }
    z2.actor.load_training_state(legacy)
    assert all(torch.equal(m, z2_moments[n]) for n, m in _moments(z2.actor).items())
    with pytest.raises(CheckpointError, match="ZeRO-2 over 1 rank.*this run is ZeRO-3 over 1"):
        to_z3.actor.load_training_state(legacy)
    with pytest.raises(
        CheckpointError, match="ZeRO's per-rank format, this run has no deepspeed_config"
    ):
        resumed.actor.load_training_state(legacy)
    # A state of another model is refused with the names that differ.
    other = dict(saved["actor"], params={"x." + n: e for n, e in saved["actor"]["params"].items()})
    with pytest.raises(CheckpointError, match=r"\(plain\) does not match the model \(missing"):
        to_z3.actor.load_training_state(other)
