"""Bounded channels between stages, with timeouts and a shared abort flag.

Every blocking put/get waits in short slices, checking the run's abort event, so that when any
stage fails the others stop within a fraction of a second, and a peer that stops producing
turns into a `StageTimeout` after `timeout_s` instead of a hang.
"""

from __future__ import annotations

import queue
import threading
import time

_POLL_S = 0.05


class PipelineAborted(RuntimeError):
    """Another stage failed; this one stops quietly (the first error is reported)."""


class StageTimeout(RuntimeError):
    pass


class EndOfStream:
    """Sentinel put once by a producer when it has nothing more to send."""

    def __repr__(self) -> str:
        return "END"


END = EndOfStream()


class Channel:
    def __init__(self, name: str, maxsize: int, abort: threading.Event, timeout_s: float):
        self.name, self.abort, self.timeout_s = name, abort, timeout_s
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)

    def put(self, item) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.abort.is_set():
                raise PipelineAborted(self.name)
            try:
                self._q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                if time.monotonic() > deadline:
                    raise StageTimeout(
                        f"channel '{self.name}': consumer took no item for "
                        f"{self.timeout_s:.0f} s (queue full)"
                    ) from None

    def get(self, timeout_s: float | None = None):
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while True:
            if self.abort.is_set():
                raise PipelineAborted(self.name)
            try:
                return self._q.get(timeout=_POLL_S)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise StageTimeout(
                        f"channel '{self.name}': no item from the producer for {limit:.0f} s"
                    ) from None

    def close(self) -> None:
        self.put(END)

    def __iter__(self):
        while True:
            item = self.get()
            if item is END:
                return
            yield item
