"""Training through the pipelined path (PIPE_MICRO_BATCH_NUM 4) with three weighted scorers:
a remote reward model on a real local HTTP server, the tiny learned reward model and a rule
function. The server's scores are part of the reward the step trains on, requests go out per
micro-batch, and a server that breaks stops the step with the redacted URL."""

from __future__ import annotations

import json

import pytest

from rlhf_pipe.pipeline.stages import StageError
from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import tiny_config
from tests.rewards.reward_server import RewardServer

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-pw"


def _config(tmp_path, tiny_assets, url, **over):
    scorers = {
        "remote": {
            "url": url,
            "weight": 2.0,
            "batch_size": 2,
            "timeout_s": 5.0,
            "max_retries": 1,
            "backoff_s": 0.01,
        },
        "rm": {"model_path": str(tiny_assets.reward), "weight": 0.1},
        "digits": {"reward_fn": "rlhf_pipe.assets.tiny:digit_reward", "weight": 0.5},
    }
    return tiny_config(
        tmp_path, PIPE_MICRO_BATCH_NUM=4, **{"model_configs.reward": {"scorers": scorers}}, **over
    )


def test_remote_scores_train_through_the_pipeline(tmp_path, tiny_assets, fresh_engine):
    with RewardServer() as srv:
        cfg = _config(tmp_path, tiny_assets, srv.url(f"bob:{SECRET}"))
        trainer = RLHFTrainer(cfg, engine=fresh_engine, console=False)
        history = trainer.learn(2)
        trainer.close()
    # 2 steps x 4 micro-batches of 4 samples, sent 2 per request.
    assert [len(s["body"]["responses"]) for s in srv.seen] == [2] * 16
    for m in history:
        # The server scores the digit share, as the rule does: same mean.
        assert m["reward/remote"] == pytest.approx(m["reward/digits"], abs=1e-6)
        total = 2.0 * m["reward/remote"] + 0.1 * m["reward/rm"] + 0.5 * m["reward/digits"]
        assert m["reward"] == pytest.approx(total, abs=1e-5)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "reward/remote" in json.loads(lines.splitlines()[0])
    assert SECRET not in lines


def test_broken_server_stops_the_step_with_the_redacted_url(tmp_path, tiny_assets, fresh_engine):
    with RewardServer(plan=[("body", b"[1, 2, 3]")]) as srv:
        cfg = _config(tmp_path, tiny_assets, srv.url(f"bob:{SECRET}"))
        trainer = RLHFTrainer(cfg, engine=fresh_engine, console=False)
        with pytest.raises(StageError) as err:
            trainer.train_step()
        trainer.close()
    text = str(err.value)
    assert text == (
        f"stage 'forward' failed: RemoteRewardError: remote reward 'remote' at "
        f"http://***@127.0.0.1:{srv.port}/score: returned 3 scores for 2 responses"
    )
