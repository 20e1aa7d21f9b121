"""step_metrics: a hand-built StepOutput of three samples in, the numbers worked out by hand."""

import pytest
import torch

from rlhf_pipe.pipeline.batch import Sample
from rlhf_pipe.pipeline.stages import StepOutput
from rlhf_pipe.step_metrics import step_metrics


def sample(i, response_len, score, relay_from=None):
    return Sample(
        i,
        i,
        0,
        torch.tensor([1, 2]),  # 2 prompt tokens each
        torch.arange(response_len),
        relay_from=relay_from,
        score=torch.tensor(score),
        score_parts=torch.tensor([score, 2 * score]),
        kl=torch.full((response_len,), 0.1 * (i + 1)),
        advantages=torch.ones(response_len),
        returns=torch.full((response_len,), 2.0),
    )


def metrics(samples, train_metrics=None, **kw):
    out = StepOutput(
        samples,
        train_metrics if train_metrics is not None else {},
        # (stage, micro-batch, start, end): generate busy 2 s, train 1 s, of a 4 s pipeline
        [("generate", 0, 0.0, 1.5), ("generate", 1, 1.5, 2.0), ("train", 0, 2.0, 3.0)],
        4.0,
    )
    plan = type(
        "Plan",
        (),
        {
            "relay": [None] * sum(s.relay_from is not None for s in samples),
            "ppo_epochs": 1,
            "update_actor": True,
        },
    )
    args = dict(
        version=3,
        reward_names=["digits", "length"],
        step_s=5.0,
        sync_s=0.25,
        last_sync={"gbps": 1.5, "bytes": 100, "seconds": 0.2},
        call_seconds={"critic": (0.5, 0.4)},
        skipped_prompts=2,
    )
    args.update(kw)
    return step_metrics(out, plan, **args)


def test_sample_and_timing_numbers():
    # Responses of 2, 3 and 5 tokens (10 in all); scores 1, 2, 6.
    m = metrics([sample(0, 2, 1.0), sample(1, 3, 2.0), sample(2, 5, 6.0)])
    assert m["policy_version"] == 3 and m["samples"] == 3 and m["relay_samples"] == 0
    assert m["reward"] == pytest.approx(3.0)
    # population std of (1, 2, 6): sqrt(((-2)^2 + (-1)^2 + 3^2) / 3) = sqrt(14 / 3)
    assert m["reward_std"] == pytest.approx((14 / 3) ** 0.5)
    assert m["reward/digits"] == pytest.approx(3.0) and m["reward/length"] == pytest.approx(6.0)
    assert m["response_len"] == pytest.approx(10 / 3) and m["response_len_max"] == 5
    assert m["tokens/sequence"] == 10 + 3 * 2
    # per token: 2 x 0.1, 3 x 0.2, 5 x 0.3 -> 2.3 / 10
    assert m["kl"] == pytest.approx(0.23)
    assert m["advantages"] == 1.0 and m["returns"] == 2.0
    assert m["busy_s/generate"] == 2.0 and m["idle_frac/generate"] == 0.5
    assert m["busy_s/train"] == 1.0 and m["idle_frac/train"] == 0.75
    assert m["gen_tokens_per_s"] == pytest.approx(10 / 2.0)
    assert m["samples_per_s"] == pytest.approx(3 / 5.0) and m["step_s"] == 5.0
    assert m["sync/seconds"] == 0.25 and m["sync/gbps"] == 1.5 and m["sync/bytes"] == 100
    assert m["remote/critic/call_s"] == 0.5 and m["remote/critic/on_rank_s"] == 0.4
    assert m["skipped_prompts"] == 2 and m["nonfinite_skipped"] == 0.0
    assert len(m["timeline"]) == 3
    # The one host sync: nothing but the timeline is left a tensor.
    assert not any(torch.is_tensor(v) for v in m.values())


def test_train_sums_are_divided_by_their_token_counts():
    tm = {
        "tokens": torch.tensor(10.0),
        "policy_loss": torch.tensor(5.0),
        "clip_frac": torch.tensor(2.0),
        "approx_kl": torch.tensor(1.0),
        "entropy": torch.tensor(30.0),
        "critic_tokens": torch.tensor(4.0),
        "value_loss": torch.tensor(2.0),
        "value_clip_frac": torch.tensor(1.0),
        "values": torch.tensor(8.0),
        "ptx_tokens": torch.tensor(5.0),
        "ptx_loss": torch.tensor(10.0),
        "actor/grad_norm": torch.tensor(0.7),
    }
    m = metrics([sample(0, 2, 1.0), sample(1, 3, 2.0)], tm)
    assert m["actor/policy_loss"] == pytest.approx(0.5)
    assert m["actor/clip_frac"] == pytest.approx(0.2)
    assert m["actor/approx_kl"] == pytest.approx(0.1)
    assert m["entropy"] == pytest.approx(3.0)
    assert m["critic/value_loss"] == pytest.approx(0.5)
    assert m["critic/clip_frac"] == pytest.approx(0.25)
    assert m["critic/values"] == pytest.approx(2.0)
    assert m["actor/ptx_loss"] == pytest.approx(2.0)
    assert m["actor/grad_norm"] == pytest.approx(0.7)


def test_replayed_samples_are_left_out_of_the_reward():
    m = metrics([sample(0, 2, 1.0), sample(1, 2, 3.0), sample(2, 2, 100.0, relay_from=0)])
    assert m["reward"] == pytest.approx(2.0)  # the fresh two only
    assert m["samples"] == 3 and m["relay_samples"] == 1
    assert m["response_len"] == 2.0  # lengths count every sample


def test_no_sync_and_no_kl_leave_their_keys_out():
    s = [sample(0, 2, 1.0), sample(1, 3, 2.0)]
    for x in s:
        x.kl = None  # the actor's forward was skipped
    m = metrics(s, last_sync={}, call_seconds={})
    assert "kl" not in m and "sync/gbps" not in m and not any(k.startswith("remote/") for k in m)
