"""RunAhead on a fake engine: which weights generate which step, the bound, failures."""

import sys
import threading
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


def test_a_failed_generation_is_reported_and_earlier_steps_still_train():
    ra = RunAhead(FakeEngine(fail_at=2), 1, _plan, 0, timeout_s=10)
    try:
        with pytest.raises(RuntimeError, match="engine broke"):
            ra.quiesce()  # step 1's generation fails
        # Step 0 was generated before: it trains (a failure used to abort its channel too).
        assert [c.prompt_ids for c in _drain(ra.take(0)[1])] == [[0]]
        with pytest.raises(PipelineAborted):
            _drain(ra.take(1)[1])
        with pytest.raises(RuntimeError, match="engine broke"):
            ra.raise_if_failed()
    finally:
        ra.close()


def test_staleness_histogram_leaves_replayed_samples_out():
    samples = [SimpleNamespace(version=v, relay_from=r) for v, r in ((3, None), (2, None), (0, 1))]
    assert staleness_metrics(samples, 3, 0) == {
        "staleness/violations": 1,
        "staleness/0": 1,
        "staleness/1": 1,
    }


class TwoEngines(FakeEngine):
    """An EnginePool's way of streaming: two engines put into one sink from their threads."""

    def generate(self, prompt_ids, indices, sampling, seeds, sink):
        def one(part):
            for i in part:
                sink.put(Completion(i, i, prompt_ids[i], [7], "stop", self.version))

        threads = [threading.Thread(target=one, args=(indices[k::2],)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def test_kept_completions_are_in_the_order_the_channel_gives_them():
    """What a checkpoint holds is replayed in that order on resume: it must be the order the
    trainer would have trained (the channel's), also with several engines putting at once."""
    n = 3000
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches between the two appends of an unlocked put
    try:
        ra = RunAhead(
            TwoEngines(),
            1,
            lambda step: SimpleNamespace(
                prompt_ids=[[step]] * n, relay=[], samples_per_step=n, sampling=None, seeds=[0]
            ),
            0,
            timeout_s=30,
        )
        try:
            ra.quiesce()  # steps 0 and 1 generated
            kept = ra.state_dict()["steps"][0]["completions"]
            assert [c.sample_id for c in _drain(ra.take(0)[1])] == [c.sample_id for c in kept]
        finally:
            ra.close()
    finally:
        sys.setswitchinterval(switch)
