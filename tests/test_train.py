"""train.py without torchrun: its command line, the lost-node note on one node, and its
library lines (logging, rlhf_pipe.train) reaching the console under quiet_console."""

import logging

from rlhf_pipe import train
from rlhf_pipe.console import quiet_console
from tests.conftest import TINY_CONFIG


def test_parse_reads_the_bench_options():
    args = train._parse([str(TINY_CONFIG), "--bench", "1,2", "--steps", "5"])
    assert args.bench == "1,2" and args.steps == 5 and args.warmup == 1
    assert not args.no_streaming


def test_no_lost_node_note_on_one_node():
    assert train._lost_node(0, "rank 1 (critic) unreachable") == ""


def test_rlhf_pipe_info_and_warnings_reach_the_console_and_the_log(tmp_path, capsys):
    with quiet_console(tmp_path) as log_file:
        train.logger.info("rlhf_pipe weight sync: %s", "gloo")
        logging.getLogger("rlhf_pipe.zero").warning("DeepSpeedCPUAdam unavailable")
        logging.getLogger("transformers.x").info("library chatter")
    err = capsys.readouterr().err
    assert "INFO rlhf_pipe.train: rlhf_pipe weight sync: gloo" in err
    assert "WARNING rlhf_pipe.zero: DeepSpeedCPUAdam unavailable" in err
    assert "library chatter" not in err
    text = log_file.read_text()
    assert "rlhf_pipe weight sync: gloo" in text and "library chatter" in text
