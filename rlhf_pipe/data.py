"""Prompt datasets: files, the reference's "path::ratio[SYS]:name" strings, mixing, batching.

Files are JSONL, JSON (a list of records) or Parquet. Each record holds the prompt under
`prompt_key`: a string, or a chat message list ([{"role": ..., "content": ...}]). Every problem
with a file is a `DataError` whose message names the file and line.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass, field


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    ratio: float = 1.0
    system: str | None = None
    name: str = ""


_SPEC = re.compile(r"^(?P<path>.+?)(?:::(?P<ratio>[^\[:]+))?(?:\[(?P<sys>[^\]]*)\])?(?::(?P<name>[^:/\\]+))?$")


def parse_dataset_spec(text: str, system_prompts: dict | None = None) -> DatasetSpec:
    """'data/a.jsonl::0.5[SYS]:math' -> DatasetSpec. [SYS] names an UPPERCASE config constant
    holding the system prompt, or is the system prompt text itself."""
    m = _SPEC.match(text.strip())
    if not m:
        raise DataError(f"dataset spec {text!r}: expected 'path::ratio[SYS_PROMPT]:name'")
    ratio = 1.0
    if m["ratio"] is not None:
        try:
            ratio = float(m["ratio"])
        except ValueError:
            raise DataError(f"dataset spec {text!r}: ratio {m['ratio']!r} is not a number") from None
        if not ratio > 0 or math.isinf(ratio):
            raise DataError(f"dataset spec {text!r}: ratio must be > 0, got {ratio}")
    system = m["sys"]
    if system is not None and system_prompts and system in system_prompts:
        system = system_prompts[system]
    path = m["path"]
    return DatasetSpec(path, ratio, system, m["name"] or os.path.splitext(os.path.basename(path))[0])


def read_records(path: str) -> list[tuple[int, dict]]:
    """(line number or record number, record) pairs from a JSONL, JSON or Parquet file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}".splitlines()[0]) from None
        records = list(enumerate(rows, 1))
    elif path.endswith(".json"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}:{line}: invalid UTF-8 at byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        except RecursionError:
            raise DataError(f"{path}: malformed JSON: nested too deeply") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        records = list(enumerate(data, 1))
    else:
        records = []
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
                if not line:
                    continue
                try:
                    records.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
                except RecursionError:
                    raise DataError(f"{path}:{lineno}: malformed JSON: nested too deeply") from None
    if not records:
        raise DataError(f"{path}: the file holds no records")
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{where}: expected a JSON object, got {type(rec).__name__}")
    return records


@dataclass
class Prompt:
    index: int            # position within the step's batch
    text: str
    ids: list[int]
    dataset: str = ""


def _messages(value, system: str | None, where: str, key: str) -> list[dict]:
    if isinstance(value, str):
        msgs = [{"role": "user", "content": value}]
    elif isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                         for m in value):
        msgs = list(value)
    else:
        raise DataError(f"{where}: field {key!r} must be a string or a list of chat messages")
    try:
        for m in msgs:
            m["content"].encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800"; the tokenizer does not
        raise DataError(f"{where}: field {key!r} holds a lone surrogate (a bad \\u escape)") from None
    if system and not any(m.get("role") == "system" for m in msgs):
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def render_prompt(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


@dataclass
class PromptSource:
    """Yields one batch of prompts per PPO step, mixing datasets by ratio.

    Each dataset is reshuffled every pass with a seed derived from (seed, dataset, pass), so the
    position (`state_dict`) is all a resume needs.
    """
    specs: list[DatasetSpec]
    tokenizer: object
    batch_size: int
    max_len: int
    prompt_key: str = "prompt"
    shuffle: bool = True
    seed: int = 0
    skipped: dict = field(default_factory=lambda: {"empty": 0, "too_long": 0})

    def __post_init__(self):
        self._data: list[list[tuple[str, list[int]]]] = []
        for spec in self.specs:
            items, before = [], dict(self.skipped)
            for where, rec in read_records(spec.path):
                loc = f"{spec.path}:{where}"
                if self.prompt_key not in rec:
                    raise DataError(f"{loc}: missing field {self.prompt_key!r}")
                msgs = _messages(rec[self.prompt_key], spec.system, loc, self.prompt_key)
                if not any(str(m["content"]).strip() for m in msgs if m.get("role") != "system"):
                    self.skipped["empty"] += 1
                    continue
                text = render_prompt(self.tokenizer, msgs)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) > self.max_len:
                    self.skipped["too_long"] += 1
                    continue
                items.append((text, ids))
            if not items:
                empty = self.skipped["empty"] - before["empty"]
                too_long = self.skipped["too_long"] - before["too_long"]
                raise DataError(f"{spec.path}: no usable prompt (empty: {empty}, "
                                f"longer than {self.max_len} tokens: {too_long})")
            self._data.append(items)
        total = sum(s.ratio for s in self.specs)
        self._quota = _largest_remainder([s.ratio / total * self.batch_size for s in self.specs])
        self._pos = [0] * len(self.specs)
        self._pass = [0] * len(self.specs)
        self._order = [self._shuffled(i) for i in range(len(self.specs))]

    def _shuffled(self, i: int) -> list[int]:
        order = list(range(len(self._data[i])))
        if self.shuffle:
            random.Random(f"{self.seed}/{i}/{self._pass[i]}").shuffle(order)
        return order

    def next_batch(self) -> list[Prompt]:
        batch = []
        for i, quota in enumerate(self._quota):
            for _ in range(quota):
                if self._pos[i] == len(self._order[i]):
                    self._pass[i] += 1
                    self._pos[i] = 0
                    self._order[i] = self._shuffled(i)
                text, ids = self._data[i][self._order[i][self._pos[i]]]
                self._pos[i] += 1
                batch.append(Prompt(len(batch), text, list(ids), self.specs[i].name))
        return batch

    def state_dict(self) -> dict:
        return {"pos": list(self._pos), "pass": list(self._pass)}

    def load_state_dict(self, state: dict) -> None:
        self._pos, self._pass = list(state["pos"]), list(state["pass"])
        self._order = [self._shuffled(i) for i in range(len(self.specs))]


def _largest_remainder(shares: list[float]) -> list[int]:
    """Integer counts summing to round(sum(shares)), each within 1 of its share."""
    floors = [int(math.floor(s)) for s in shares]
    missing = round(sum(shares)) - sum(floors)
    by_remainder = sorted(range(len(shares)), key=lambda i: floors[i] - shares[i])
    for i in by_remainder[:missing]:
        floors[i] += 1
    return floors
