"""timeline.py: rows of a step's timeline and its Chrome trace."""

import json

from rlhf_pipe.timeline import ROWS, chrome_trace, role_of, rows_of, write_chrome_trace

TIMELINE = [
    ("generate", -1, 0.0, 1.0),
    ("gen_mb", 0, 0.2, 0.5),
    ("forward", 0, 0.5, 0.7),
    ("critic.forward", 0, 0.5, 0.6),
    ("train", 0, 0.7, 0.9),
    ("optimizer", -1, 0.9, 1.0),
    ("unknown", 0, 0.0, 0.1),
]


def test_role_of_reads_only_role_calls():
    assert role_of("critic.train") == "critic"
    assert role_of("train") is None
    assert role_of("nobody.train") is None


def test_rows_are_the_stages_then_the_roles_present():
    assert rows_of(TIMELINE) == [*ROWS, "critic"]


def test_chrome_trace_puts_each_event_on_its_row(tmp_path):
    trace = chrome_trace(TIMELINE)
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    by_name = {e["name"]: e for e in events}
    assert len(events) == 6  # "unknown" has no row
    assert by_name["generate all"]["tid"] == 0 and by_name["gen_mb mb0"]["tid"] == 0
    assert by_name["optimizer all"]["tid"] == 3
    assert by_name["critic.forward mb0"]["tid"] == 4
    assert by_name["forward mb0"]["ts"] == 500000.0
    assert abs(by_name["forward mb0"]["dur"] - 200000.0) < 1e-3
    path = write_chrome_trace(TIMELINE, tmp_path / "trace.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(trace))
