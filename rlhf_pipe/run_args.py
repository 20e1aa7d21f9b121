"""The run arguments, defined once, for `rlhf-pipe train/bench/plan` and `-m rlhf_pipe.train`.

Config overrides come from `--set KEY=VALUE` (one pair; the value a Python literal) and
`--cfg-options KEY=VALUE [KEY=VALUE ...]` (mmengine's syntax, see `parse_cfg_value`). Both
may be given, any number of times: they apply in command-line order, so when two name the same
key the later one wins. `--pipe`, `--work-dir` and `--max-steps` are applied last and win over
both. Bad pairs are reported when the config is loaded, as one line (exit code 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


class _Override(argparse.Action):
    """Append (flag, text) to `args.overrides`, one list for both flags, in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        pairs = list(getattr(namespace, self.dest, None) or [])
        for text in values if isinstance(values, list) else [values]:
            pairs.append((option_string, text))
        setattr(namespace, self.dest, pairs)


class UserError(Exception):
    """A launch mistake the user can fix (a flag, a placement that does not fit the world)."""


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean a mistake the user can fix: one line, exit code 2."""
    from rlhf_pipe.checkpoint import CheckpointError
    from rlhf_pipe.config import ConfigError
    from rlhf_pipe.data import DataError
    from rlhf_pipe.models import ModelLoadError

    return (ConfigError, DataError, ModelLoadError, CheckpointError, UserError)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """CONFIG, --set and --cfg-options."""
    p.add_argument("config")
    p.add_argument(
        "--set",
        action=_Override,
        dest="overrides",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. train_config.max_train_step=3 (a Python literal)",
    )
    p.add_argument(
        "--cfg-options",
        action=_Override,
        dest="overrides",
        nargs="+",
        metavar="KEY=VALUE",
        help="override config keys, mmengine style: a=1 b=[1,2] c=(1,2) d=1,2 e='text'; "
        "when --set and --cfg-options name one key, the later on the command line wins",
    )


def add_verbose_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show the INFO logs of vLLM, DeepSpeed, transformers and torch.distributed on "
        "the console (by default they go to WORK_DIR/logs/rank<R>.log)",
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Everything a training run takes: config arguments, --resume, --work-dir, --max-steps,
    --pipe, --verbose."""
    add_config_arguments(p)
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from the newest checkpoint in the work dir, or from PATH",
    )
    p.add_argument("--work-dir", help="train_config.work_dir")
    p.add_argument("--max-steps", type=int, help="train_config.max_train_step")
    p.add_argument("--pipe", type=int, help="PIPE_MICRO_BATCH_NUM")
    add_verbose_argument(p)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted-key overrides of a parsed command line, later ones first in precedence."""
    from rlhf_pipe.validation import parse_override

    out: dict[str, Any] = {}
    for flag, text in getattr(args, "overrides", None) or []:
        key, value = parse_override(text) if flag == "--set" else parse_cfg_option(text)
        out.pop(key, None)  # re-insert: the dict's order stays the order of application
        out[key] = value
    for key, attr in (
        ("PIPE_MICRO_BATCH_NUM", "pipe"),
        ("train_config.work_dir", "work_dir"),
        ("train_config.max_train_step", "max_steps"),
    ):
        value = getattr(args, attr, None)
        if value is not None and not isinstance(value, list):  # bench's --pipe is a list
            out.pop(key, None)
            out[key] = value
    return out


def load_run_config(args: argparse.Namespace):
    from rlhf_pipe.validation import load_config

    return load_config(args.config, overrides(args))


def forward_argv(args: argparse.Namespace) -> list[str]:
    """The run arguments again, for `-m rlhf_pipe.train` under torchrun: every override as one
    `--set KEY=repr(value)`, which parses back to the same value."""
    argv = [args.config]
    for key, value in overrides(args).items():
        argv += ["--set", f"{key}={value!r}"]
    if args.resume:
        argv += ["--resume", args.resume]
    if args.verbose:
        argv.append("--verbose")
    return argv


def apply_resume(trainer, spec: str | None) -> Path | None:
    """--resume (auto | PATH): the trainer resolves and loads it (RLHFTrainer.resume, which
    also tells the work-dir claim that this run continues the one there). None when there is
    nothing to resume from (no flag, or 'auto' with no checkpoint yet)."""
    if not spec:
        return None
    return trainer.resume(spec)


# ----------------------------------------------------------------------------- --cfg-options


def parse_cfg_option(text: str) -> tuple[str, Any]:
    """'a.b=[1,2]' -> ('a.b', [1, 2]), with mmengine's DictAction syntax (see parse_cfg_value)."""
    from rlhf_pipe.config import ConfigError

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--cfg-options {text}: expected KEY=VALUE")
    try:
        return key.strip(), parse_cfg_value(value)
    except ValueError as e:
        raise ConfigError(f"--cfg-options {text}: {e}") from None


def parse_cfg_value(text: str) -> Any:
    """mmengine's `--cfg-options` value syntax.

    `1` -> 1, `0.5` -> 0.5, `true`/`False` -> bool, `None` -> None, other words -> str;
    `[a,b]` -> list, `(a,b)` -> tuple, nested freely; `a,b` (a top-level comma) -> list.
    Unlike mmengine, a quoted value stays a string as written (`'1'` -> '1', `"a b"` keeps
    its space), so a string that looks like a number or holds a comma can be given.
    """
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and text[0] not in text[1:-1]:
        return text[1:-1]
    if _encloses(text, "(", ")"):
        return tuple(parse_cfg_value(x) for x in _split_top(text[1:-1]))
    if _encloses(text, "[", "]"):
        return [parse_cfg_value(x) for x in _split_top(text[1:-1])]
    parts = _split_top(text)
    if len(parts) > 1 or text.endswith(","):
        return [parse_cfg_value(x) for x in parts]
    return _scalar(text)


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text == "None":
        return None
    return text


def _encloses(text: str, open_: str, close: str) -> bool:
    """True when text is one bracket group: '(1,2)' yes, '(1),(2)' no."""
    if not (text.startswith(open_) and text.endswith(close)):
        return False
    depth, quote = 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth == 0 and i != len(text) - 1:
                return False
    return True


def _split_top(text: str) -> list[str]:
    """Split on the commas outside brackets and quotes; a trailing comma adds no element."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise ValueError(f"unbalanced {'quotes' if quote else 'brackets'} in {text!r}")
    parts.append(text[start:])
    if parts[-1].strip() == "":
        parts.pop()
    return parts
