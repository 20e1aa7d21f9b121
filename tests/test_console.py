"""The quiet console: the libraries' INFO goes to WORK_DIR/logs/rank<R>.log, their warnings
reach the console except the documented harmless ones, --verbose shows all."""

import logging
import os

from rlhf_pipe.console import HARMLESS, ConsoleFilter, quiet_console


def _record(name, level, msg, *args):
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_filter_keeps_warnings_and_drops_info_and_the_harmless_list():
    f = ConsoleFilter()
    assert not f.filter(_record("vllm.config", logging.INFO, "Initializing a V1 LLM engine"))
    assert f.filter(_record("vllm.worker", logging.WARNING, "KV cache is too small"))
    assert f.filter(_record("DeepSpeed", logging.ERROR, "overflow"))
    assert f.filter(_record("rlhf_pipe.versions", logging.INFO, "ours"))
    # vLLM formats this one with %s: the filter reads the formatted message.
    rotary = _record("vllm.model_executor.reload", logging.WARNING, "%s: Failed to load weights")
    rotary.args = ("RotaryEmbedding",)
    assert not f.filter(rotary)
    other = _record("vllm.model_executor.reload", logging.WARNING, "%s: Failed to load weights")
    other.args = ("QKVParallelLinear",)  # a real weight that did not load: shown
    assert f.filter(other)
    assert not f.filter(_record("py.warnings", logging.WARNING, "FutureWarning: deprecated"))
    assert ConsoleFilter(verbose=True).filter(_record("vllm", logging.INFO, "config"))
    for prefix, start, why in HARMLESS:
        assert prefix in ("vllm",) and start and why
        assert not f.filter(_record(prefix + ".x", logging.WARNING, start + " ..."))


def test_quiet_console_routes_to_the_rank_file(tmp_path, capfd):
    before = os.environ.get("VLLM_LOGGING_CONFIG_PATH")
    with quiet_console(tmp_path, rank=3) as log_file:
        assert log_file == tmp_path / "logs" / "rank3.log"
        assert os.environ["VLLM_LOGGING_CONFIG_PATH"].endswith("rank3.logging.json")
        logging.getLogger("vllm.engine").info("engine config: a very long line")
        logging.getLogger("torch.distributed.c10d").info("rendezvous done")
        logging.getLogger("transformers.modeling").warning("weights not initialized: score")
        logging.getLogger("vllm.reload").warning("%s: Failed to load weights", "RotaryEmbedding")
    err = capfd.readouterr().err
    text = log_file.read_text()
    assert "engine config" in text and "rendezvous done" in text and "Failed to load" in text
    assert "engine config" not in err and "rendezvous" not in err and "Failed to load" not in err
    assert "WARNING transformers.modeling: weights not initialized: score" in err
    assert os.environ.get("VLLM_LOGGING_CONFIG_PATH") == before
    assert not logging.getLogger("vllm").handlers and logging.getLogger("vllm").propagate


def test_verbose_shows_info(tmp_path, capfd):
    with quiet_console(tmp_path, verbose=True):
        logging.getLogger("vllm.engine").info("engine config")
    assert "INFO vllm.engine: engine config" in capfd.readouterr().err
