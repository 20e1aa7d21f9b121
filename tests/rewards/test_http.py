"""The remote reward model against a real local HTTP server: batching, timeouts, retries,
bad answers, and credentials that never show."""

from __future__ import annotations

import base64
import socket
import time

import pytest

from rlhf_pipe.assets.tiny import digit_reward
from rlhf_pipe.rewards.http import HTTPRewardModel, RemoteRewardError, redact_url
from tests.rewards.reward_server import RewardServer

PASSWORD = "hunter2-secret"
PROMPTS = [f"p{i}" for i in range(7)]
RESPONSES = ["12", "ab", "1a", "9 9", "x", "77", "abc1"]


def _model(url, **kw):
    kw = {"batch_size": 3, "timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.01, **kw}
    return HTTPRewardModel("rm", url, **kw)


def test_good_server_scores_in_batches_with_basic_auth():
    with RewardServer() as srv:
        rm = _model(srv.url(f"bob:{PASSWORD}"))
        assert rm(PROMPTS, RESPONSES) == pytest.approx(digit_reward(PROMPTS, RESPONSES))
    # 7 samples in requests of at most 3, in order
    assert [len(s["body"]["responses"]) for s in srv.seen] == [3, 3, 1]
    assert [r for s in srv.seen for r in s["body"]["responses"]] == RESPONSES
    expected = "Basic " + base64.b64encode(f"bob:{PASSWORD}".encode()).decode()
    assert srv.seen[0]["headers"]["Authorization"] == expected


def test_token_from_environment_is_a_bearer_header(monkeypatch):
    monkeypatch.setenv("RM_TEST_TOKEN", PASSWORD)
    with RewardServer() as srv:
        rm = _model(srv.url(), token_env="RM_TEST_TOKEN")
        rm(PROMPTS[:1], RESPONSES[:1])
    assert srv.seen[0]["headers"]["Authorization"] == f"Bearer {PASSWORD}"
    assert PASSWORD not in repr(rm)


def test_slow_server_times_out_retries_then_fails_within_bound():
    with RewardServer(default="slow", delay_s=3.0) as srv:
        rm = _model(srv.url(f"bob:{PASSWORD}"), timeout_s=0.3, max_retries=2)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError) as err:
            rm(PROMPTS[:2], RESPONSES[:2])
        elapsed = time.monotonic() - start
    msg = str(err.value)
    assert msg == (
        f"remote reward 'rm' at http://***@127.0.0.1:{srv.port}/score: timed out "
        f"after 3 tries (timeout 0.3 s each)"
    )
    assert len(srv.seen) == 3
    assert 0.9 <= elapsed < 2.0  # 3 x 0.3 s + backoff, never the server's 3 s


def test_server_errors_are_retried_until_success():
    with RewardServer(plan=[("status", 500), ("status", 503)]) as srv:
        rm = _model(srv.url())
        assert rm(PROMPTS[:2], RESPONSES[:2]) == pytest.approx([1.0, 0.0])
    assert rm.retries == 2 and len(srv.seen) == 3


def test_refused_connection_is_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rm = _model(f"http://bob:{PASSWORD}@127.0.0.1:{port}/score?key={PASSWORD}", max_retries=1)
    with pytest.raises(RemoteRewardError, match=r"ConnectionRefusedError.* after 2 tries") as err:
        rm(PROMPTS[:1], RESPONSES[:1])
    assert f"http://***@127.0.0.1:{port}/score?key=***" in str(err.value)
    assert PASSWORD not in str(err.value)


@pytest.mark.parametrize(
    "action, message",
    [
        (("body", b"<html>oops</html>"), "answer is not JSON: '<html>oops</html>'"),
        (("body", b"[1.0]"), "returned 1 scores for 2 responses"),
        (("body", b'[1.0, "high"]'), "score 1 is not a number: '\"high\"'"),
        (("body", b"[1.0, NaN]"), "score 1 is not finite: nan"),
        (("body", b'{"rewards": [1, 2]}'), "expected a JSON list of scores, got"),
        (("status", 404), 'HTTP 404: \'{"error": "server says no"}\' (not retried)'),
    ],
)
def test_bad_answers_fail_at_once_with_one_line(action, message):
    with RewardServer(plan=[action]) as srv:
        rm = _model(srv.url(f"bob:{PASSWORD}"))
        with pytest.raises(RemoteRewardError) as err:
            rm(PROMPTS[:2], RESPONSES[:2])
    text = str(err.value)
    assert text.startswith(f"remote reward 'rm' at http://***@127.0.0.1:{srv.port}/score: ")
    assert message in text and "\n" not in text
    assert len(srv.seen) == 1  # a bad answer is not retried
    assert PASSWORD not in text


def test_scores_object_is_accepted():
    with RewardServer(plan=[("body", b'{"scores": [0.5, -2]}')]) as srv:
        assert _model(srv.url())(PROMPTS[:2], RESPONSES[:2]) == [0.5, -2.0]


def test_server_echoing_the_secret_is_scrubbed():
    body = f"not json, your token is {PASSWORD}".encode()
    with RewardServer(plan=[("body", body)]) as srv:
        rm = _model(srv.url(f"bob:{PASSWORD}"))
        with pytest.raises(RemoteRewardError) as err:
            rm(PROMPTS[:1], RESPONSES[:1])
    assert "your token is ***" in str(err.value) and PASSWORD not in str(err.value)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://bob:tok@rm.example:8443/score", "https://***@rm.example:8443/score"),
        ("https://tok@rm.example/score", "https://***@rm.example/score"),
        ("http://rm.example/s?api_key=tok&x=1", "http://rm.example/s?api_key=***&x=***"),
        ("http://a%40b:p%3Aw@h/s", "http://***@h/s"),
        ("http://rm.example/score", "http://rm.example/score"),
        ("http://[::1", "***"),  # unparseable: nothing of it is shown
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown
