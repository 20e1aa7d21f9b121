"""RunAhead on a fake engine: which weights generate which step, the bound, failures."""

from types import SimpleNamespace

import pytest
import torch

from rlhf_pipe.pipeline.channel import END, PipelineAborted
from rlhf_pipe.pipeline.run_ahead import RunAhead, staleness_metrics
from rlhf_pipe.rollout.types import Completion


class FakeEngine:
    def __init__(self, fail_at=None):
        self.version, self.loads, self.fail_at, self.calls = 0, [], fail_at, 0

    def generate(self, prompt_ids, indices, sampling, seeds, sink):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError("engine broke")
        for i in indices:
            sink.put(Completion(i, i, prompt_ids[i], [7], "stop", self.version))

    def load_weights(self, named, version):
        self.loads.append((version, [t.item() for _, t in named]))
        self.version = version


def _plan(step):
    return SimpleNamespace(
        prompt_ids=[[step]], relay=[], samples_per_step=1, sampling=None, seeds=[0]
    )


def _drain(channel):
    items = []
    while (item := channel.get()) is not END:
        items.append(item)
    return items


@pytest.mark.parametrize("s", [1, 2])
def test_step_j_uses_the_weights_after_step_j_minus_s_minus_1(s):
    engine = FakeEngine()
    ra = RunAhead(engine, s, _plan, 0, timeout_s=10)
    try:
        versions = []
        for k in range(6):
            plan, channel = ra.take(k)
            versions.append(_drain(channel)[0].version)
            ra.publish(k, k + 1, [("w", torch.tensor(float(k + 1)))])
        # Steps 0..s from the initial weights, then step j from version j - s.
        assert versions == [0] * (s + 1) + [j - s for j in range(s + 1, 6)]
        ra.quiesce()  # steps 6..6+s generated; the engine holds the newest weights
        assert engine.version == 6 and sorted(ra.state_dict()["steps"]) == list(range(6, 7 + s))
    finally:
        ra.close()


def test_a_failed_generation_is_reported():
    ra = RunAhead(FakeEngine(fail_at=2), 1, _plan, 0, timeout_s=10)
    try:
        _drain(ra.take(0)[1])
        with pytest.raises((PipelineAborted, RuntimeError)):
            _drain(ra.take(1)[1])
        assert "engine broke" in ra.error
    finally:
        ra.close()


def test_staleness_histogram_leaves_replayed_samples_out():
    samples = [SimpleNamespace(version=v, relay_from=r) for v, r in ((3, None), (2, None), (0, 1))]
    assert staleness_metrics(samples, 3, 0) == {
        "staleness/violations": 1,
        "staleness/0": 1,
        "staleness/1": 1,
    }
