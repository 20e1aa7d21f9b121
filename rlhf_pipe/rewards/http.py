"""A remote reward model over HTTP, and the helpers that keep its credentials out of sight.

Protocol: one POST per `batch_size` samples, body `{"prompts": [...], "responses": [...]}`,
answer a JSON list of numbers, one per response (or `{"scores": [...]}`).

Failures:
- connection errors, timeouts and 5xx are retried `max_retries` times, waiting
  `backoff_s * 2**attempt` between tries;
- a 4xx, a body that is not JSON, a list of the wrong length, a non-numeric or non-finite score
  is an error at once (retrying would give the same answer).
Every error is one line naming the scorer and its redacted URL.

Credentials come in the URL (`https://user:token@host/score`, sent as HTTP Basic auth) or from
an environment variable (`token_env`, sent as `Authorization: Bearer ...`). They never appear
in an error, a log line or a metric: messages carry `redact_url(url)`, and any text that came
back from the server passes through `scrub` first.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import socket
import ssl
import time
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"


class RemoteRewardError(RuntimeError):
    """A remote reward model failed for good (after retries, or at once for a bad answer)."""


def redact_url(url: str) -> str:
    """`url` with its user info and every query value replaced by ***.

    'https://bob:s3cret@rm.example:8443/score?key=abc'
        -> 'https://***@rm.example:8443/score?key=***'.
    Query values are masked whatever their name: a token may hide under any parameter name.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # not even a URL: show nothing of it
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        query = urlencode(
            [(k, MASK) for k, _ in parse_qsl(query, keep_blank_values=True)], safe="*"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def url_secrets(url: str, token_env: str | None = None) -> list[str]:
    """The secret strings a URL (and its token variable) carries, raw and percent-decoded."""
    out = []
    parts = urlsplit(url)
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        out += [userinfo, *userinfo.split(":", 1)]
    out += [v for _, v in parse_qsl(parts.query, keep_blank_values=True)]
    if token_env and os.environ.get(token_env):
        out.append(os.environ[token_env])
    out += [unquote(s) for s in out]
    # Longest first, so a secret that contains another is masked whole.
    return sorted({s for s in out if len(s) >= 3}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """`text` with every secret replaced by *** (for server answers quoted in errors)."""
    for s in secrets:
        text = text.replace(s, MASK)
    return text


class _Retryable(Exception):
    """A failure worth another try: connection error, timeout, 5xx."""


class HTTPRewardModel:
    """Scores (prompt, response) pairs with a reward model behind an HTTP endpoint."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        batch_size: int = 16,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        token_env: str | None = None,
    ):
        self.name, self.batch_size, self.timeout_s = name, batch_size, timeout_s
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.shown_url = redact_url(url)
        self._secrets = url_secrets(url, token_env)
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        if token_env:
            token = os.environ.get(token_env)
            if not token:
                raise RemoteRewardError(
                    f"remote reward {name!r} at {self.shown_url}: "
                    f"environment variable {token_env} is not set"
                )
            self._headers["Authorization"] = f"Bearer {token}"
        self.requests = 0  # counters for tests and metrics (never the URL itself)
        self.retries = 0

    def __repr__(self) -> str:  # a repr in a traceback or a log must not leak either
        return f"HTTPRewardModel({self.name!r}, {self.shown_url!r})"

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(responses), self.batch_size):
            out += self._score_batch(
                prompts[start : start + self.batch_size], responses[start : start + self.batch_size]
            )
        return out

    def _fail(self, what: str) -> RemoteRewardError:
        return RemoteRewardError(
            scrub(f"remote reward {self.name!r} at {self.shown_url}: {what}", self._secrets)
        )

    def _score_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        body = json.dumps({"prompts": prompts, "responses": responses}).encode()
        attempt = 0
        while True:
            try:
                status, data = self._post(body)
                if 500 <= status:
                    raise _Retryable(f"HTTP {status}")
                break
            except (_Retryable, OSError, http.client.HTTPException) as e:
                # OSError covers refused/reset connections and socket timeouts.
                if attempt >= self.max_retries:
                    raise self._fail(
                        f"{_describe(e)} after {attempt + 1} tries "
                        f"(timeout {self.timeout_s:g} s each)"
                    ) from None
                time.sleep(self.backoff_s * 2**attempt)
                attempt += 1
                self.retries += 1
        if status >= 400:
            raise self._fail(f"HTTP {status}: {_snippet(data)} (not retried)")
        return self._parse(data, len(responses))

    def _post(self, body: bytes) -> tuple[int, bytes]:
        """One request with a deadline on the whole exchange, not only on each socket read."""
        deadline = time.monotonic() + self.timeout_s
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout_s, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        self.requests += 1
        try:
            conn.request("POST", self._path, body=body, headers=self._headers)
            sock = conn.sock  # held here: getresponse() drops it from `conn` on Connection: close
            resp = conn.getresponse()
            chunks = []
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                sock.settimeout(left)  # a server that trickles bytes still times out
                chunk = resp.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            return resp.status, b"".join(chunks)
        finally:
            conn.close()

    def _parse(self, data: bytes, expected: int) -> list[float]:
        try:
            scores = json.loads(data)
        except ValueError:
            raise self._fail(f"answer is not JSON: {_snippet(data)}") from None
        if isinstance(scores, dict) and "scores" in scores:
            scores = scores["scores"]
        if not isinstance(scores, list):
            raise self._fail(f"expected a JSON list of scores, got {_snippet(data)}")
        if len(scores) != expected:
            raise self._fail(f"returned {len(scores)} scores for {expected} responses")
        for i, v in enumerate(scores):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise self._fail(f"score {i} is not a number: {_snippet(json.dumps(v).encode())}")
            if not math.isfinite(v):
                raise self._fail(f"score {i} is not finite: {v}")
        return [float(v) for v in scores]


def _describe(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, _Retryable):
        return str(e)
    return f"{type(e).__name__}: {e}"


def _snippet(data: bytes, limit: int = 80) -> str:
    text = " ".join(data.decode("utf-8", "replace").split())
    return repr(text if len(text) <= limit else text[:limit] + "...")
