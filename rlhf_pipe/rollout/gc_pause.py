"""`rollout_config.pause_gc`: Python's cyclic garbage collector off for one generation.

A generation engine in the trainer's process allocates Python objects for every request at
every decode step (vLLM's scheduler most of all); in a trainer's heap the collections they set
off took 18% of a 1.8B generation on an H200 (BENCHMARKS.md, "The decode step"). Reference
counting still frees everything that is not a cycle; cycles wait until the generation ends.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc(enabled: bool = True) -> Iterator[None]:
    """The collector off inside, and left as it was found (a caller's gc.disable() stands).
    Not gc.freeze(): frozen objects are never collected, so a trainer dropped later (a bench's
    next M, a test's next run) would keep its memory, GPU memory included."""
    if not enabled or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
