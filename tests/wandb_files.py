"""Read the metric names and run settings out of a W&B offline run file (run-<id>.wandb).

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each chunk
with a 7-byte header (crc32, length, kind: 1 full, 2 first, 3 middle, 4 last) and a slice of
one protobuf `Record`.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

BLOCK = 32768


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    pos, buf = 7, b""
    while pos + 7 <= len(raw):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if (n == 0 and kind == 0) or pos + 7 + n > len(raw):  # the end, or a chunk being written
            break
        buf += raw[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def offline_run(work_dir: Path, wait_s: float = 30.0) -> tuple[dict, list[dict]]:
    """(run settings, one {metric: value} per logged step) of the single offline run. W&B's
    service process may still be writing after `finish()` returns: wait for the exit record."""
    (path,) = sorted(Path(work_dir).glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + wait_s
    while True:
        run, rows, done = {}, [], False
        for r in records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = {
                    "project": r.run.project,
                    "name": r.run.display_name,
                    "tags": list(r.run.tags),
                }
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in r.history.item})
            done |= kind == "exit"
        if done or time.monotonic() > deadline:
            return run, rows
        time.sleep(0.5)
