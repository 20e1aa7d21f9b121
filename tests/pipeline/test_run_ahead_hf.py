"""Run-ahead (max_staleness=1) on the transformers generator (generator_type 'hf'), CPU.

The hf engine generates in this process, on the run-ahead thread, with its own copy of the
actor's module (builders.build_engine deep-copies it), while the trainer's stage threads
train the actor: two modules, no shared storage, and the weights reach the copy only as the
snapshot publish() takes, loaded by the generation thread between two steps.
"""

import pytest
import torch

from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow
HF = {"model_configs.policy.generator_config.generator_type": "hf"}


def _trainer(tmp_path, **over):
    cfg = tiny_config(tmp_path, **{**HF, "train_config.max_staleness": 1, **over})
    return RLHFTrainer(cfg, console=False)


def _storage(module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_hf_generation_of_step_k_plus_1_overlaps_train_of_step_k(tmp_path):
    trainer = _trainer(tmp_path / "m4")
    assert _storage(trainer.engine.model).isdisjoint(_storage(trainer.actor.model))
    try:
        history = trainer.learn(4)
        ahead = trainer.run_ahead
        generated = {j: (a, b) for j, a, b, _ in ahead.timeline}
        trained = {k: (a, b) for k, a, b in ahead.trained}
        # The same schedule as on vLLM: steps 0 and 1 from the initial weights, then j - 2.
        assert [v for _, _, _, v in ahead.timeline[:4]] == [0, 0, 1, 2]
        samples = history[0]["samples"]
        assert [h.get("staleness/1", 0) for h in history] == [0, samples, samples, samples]
        # Step k >= 2 trained samples generated after the thread loaded W(k - 2): its metrics
        # report that load (the engine's, not the trainer's own sync).
        assert all(h["sync/bytes"] > 0 for h in history[2:])
        # The thread loaded the last published snapshot (the final save waited for it).
        final = trainer.actor.model.state_dict()
        assert all(torch.equal(v, final[k]) for k, v in trainer.engine.model.state_dict().items())
    finally:
        trainer.close()
    overlap = {
        k: min(generated[k + 1][1], end) - max(generated[k + 1][0], start)
        for k, (start, end) in trained.items()
    }
    print(f"hf run-ahead: Train(k) x Generate(k+1) overlap, seconds: {overlap}")
    assert max(overlap.values()) > 0, (generated, trained)
    # Train-stage timing cannot change the result: serial micro-batches give the same weights.
    serial = _trainer(tmp_path / "m1", PIPE_MICRO_BATCH_NUM=1)
    try:
        history_1 = serial.learn(4)
    finally:
        serial.close()
    assert [h["reward"] for h in history_1] == [h["reward"] for h in history]
    serial_w = serial.actor.model.state_dict()
    assert all(torch.equal(v, serial_w[k]) for k, v in final.items())


def test_a_failed_generation_names_its_cause_and_the_generated_step_trains(tmp_path):
    trainer = _trainer(tmp_path)
    generate, calls = trainer.engine.generate, []

    def breaks_on_the_second_call(*args):
        calls.append(len(calls))
        if len(calls) == 2:  # step 1's generation, after step 0's has finished
            raise ValueError("engine broke")
        return generate(*args)

    trainer.engine.generate = breaks_on_the_second_call
    try:
        with pytest.raises(RuntimeError, match="run-ahead generation failed: ValueError: engine"):
            trainer.learn(3)
    finally:
        trainer.close()
    assert len(trainer.history) == 1  # step 0 was generated whole: it trained
