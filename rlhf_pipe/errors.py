"""The config error, in a module of its own so that any module may raise it without importing
the config schema (rlhf_pipe.lora raises it for a lora_layer that matches no module)."""

from __future__ import annotations

import re


class ConfigError(ValueError):
    """A bad config value. `str(err)` is the whole one-line message. Any URL quoted in it
    (e.g. a bad value's repr) is shown redacted: credentials never reach an error line."""

    def __init__(self, message: str):
        from rlhf_pipe.rewards.http import redact_url

        super().__init__(
            re.sub(
                r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+",
                lambda m: redact_url(m.group(0)),
                str(message),
            )
        )
