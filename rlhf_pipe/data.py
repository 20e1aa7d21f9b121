"""Prompt datasets: files, the reference's "path::ratio[SYS]:name" strings, mixing, batching,
batch-generation ranking, and the relay buffer of past episodes.

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
import warnings
from dataclasses import dataclass, field
from fractions import Fraction


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    ratio: float = 1.0
    system: str | None = None
    name: str = ""


_SPEC = re.compile(
    r"^(?P<path>.+?)(?:::(?P<ratio>[^\[:]+))?(?:\[(?P<sys>[^\]]*)\])?(?::(?P<name>[^:/\\]+))?$"
)


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
            raise DataError(
                f"dataset spec {text!r}: ratio {m['ratio']!r} is not a number"
            ) from None
        if not ratio > 0 or math.isinf(ratio):
            raise DataError(f"dataset spec {text!r}: ratio must be > 0, got {ratio}")
    system = m["sys"]
    if system is not None and system_prompts and system in system_prompts:
        system = system_prompts[system]
    path = m["path"]
    return DatasetSpec(
        path, ratio, system, m["name"] or os.path.splitext(os.path.basename(path))[0]
    )


def read_records(path: str) -> list[tuple[int, dict]]:
    """(line number or record number, record) pairs from a JSONL, JSON or Parquet file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"
            ) from None
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
    index: int  # position within the step's batch
    text: str
    ids: list[int]
    dataset: str = ""


def _messages(value, system: str | None, where: str, key: str) -> list[dict]:
    if isinstance(value, str):
        msgs = [{"role": "user", "content": value}]
    elif isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in value
    ):
        msgs = list(value)
    else:
        raise DataError(f"{where}: field {key!r} must be a string or a list of chat messages")
    try:
        for m in msgs:
            m["content"].encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800"; the tokenizer does not
        raise DataError(
            f"{where}: field {key!r} holds a lone surrogate (a bad \\u escape)"
        ) from None
    if system and not any(m.get("role") == "system" for m in msgs):
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def render_prompt(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


class RatioSampler:
    """Which record of which dataset comes next, mixing datasets by their ratios.

    The ratios are shares of everything drawn (dataset i gets r_i / sum(r) of all items, as the
    reference's in-batch sampler means them). Each pick goes to the dataset furthest below its
    share of the items drawn so far, so every dataset stays within one item of its share at
    every point: a small ratio is honoured across steps even when one step's batch is too small
    to hold it, and a step of any size (the relay can shrink it) keeps the mix. Each dataset is
    reshuffled every pass with a seed derived from (seed, dataset, pass), so (pos, pass) per
    dataset is the whole state.
    """

    def __init__(self, sizes: list[int], ratios: list[float], shuffle: bool = True, seed: int = 0):
        self.sizes, self.shuffle, self.seed = list(sizes), shuffle, seed
        # Exact fractions: a pick never depends on float rounding of the shares.
        self._ratios = [Fraction(r) for r in ratios]
        self._total_ratio = sum(self._ratios)
        self._pos = [0] * len(sizes)
        self._pass = [0] * len(sizes)
        self._order = [self._shuffled(i) for i in range(len(sizes))]

    def _shuffled(self, i: int) -> list[int]:
        order = list(range(self.sizes[i]))
        if self.shuffle:
            random.Random(f"{self.seed}/{i}/{self._pass[i]}").shuffle(order)
        return order

    def drawn(self, i: int) -> int:
        return self._pass[i] * self.sizes[i] + self._pos[i]

    def take(self, count: int) -> list[tuple[int, int]]:
        """The next `count` (dataset, record) pairs."""
        out = []
        for _ in range(count):
            drawn = [self.drawn(i) for i in range(len(self.sizes))]
            after = sum(drawn) + 1
            # deficit_i = share_i * after - drawn_i, scaled by the ratio total to stay exact
            i = max(
                range(len(self.sizes)),
                key=lambda j: (self._ratios[j] * after - drawn[j] * self._total_ratio, -j),
            )
            if self._pos[i] == self.sizes[i]:
                self._pass[i] += 1
                self._pos[i] = 0
                self._order[i] = self._shuffled(i)
            out.append((i, self._order[i][self._pos[i]]))
            self._pos[i] += 1
        return out

    def state_dict(self) -> dict:
        return {"pos": list(self._pos), "pass": list(self._pass)}

    def load_state_dict(self, state: dict) -> None:
        self._pos, self._pass = list(state["pos"]), list(state["pass"])
        self._order = [self._shuffled(i) for i in range(len(self.sizes))]


class DataWarning(UserWarning):
    """Prompts skipped by a filter the user asked for (counted, not an error)."""


@dataclass
class PromptSource:
    """Yields one batch of prompts per PPO step, mixing datasets by ratio (`RatioSampler`).

    Prompts that are empty, longer than `max_len` or shorter than `min_len` tokens
    (generator_config.batch_generation.min_prompt_length) are skipped when the files are read,
    and counted in `skipped`; the position (`state_dict`) is all a resume needs.
    """

    specs: list[DatasetSpec]
    tokenizer: object
    batch_size: int
    max_len: int
    prompt_key: str = "prompt"
    shuffle: bool = True
    seed: int = 0
    min_len: int = 0
    skipped: dict = field(default_factory=lambda: {"empty": 0, "too_long": 0, "too_short": 0})

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
                if len(ids) < self.min_len:
                    self.skipped["too_short"] += 1
                    continue
                items.append((text, ids))
            short = self.skipped["too_short"] - before["too_short"]
            if short:
                warnings.warn(
                    f"{spec.path}: skipped {short} prompts shorter than "
                    f"min_prompt_length={self.min_len} tokens",
                    DataWarning,
                    stacklevel=3,
                )  # the caller of PromptSource(...)
            if not items:
                empty = self.skipped["empty"] - before["empty"]
                too_long = self.skipped["too_long"] - before["too_long"]
                raise DataError(
                    f"{spec.path}: no usable prompt (empty: {empty}, "
                    f"longer than {self.max_len} tokens: {too_long}"
                    + (f", shorter than {self.min_len} tokens: {short})" if self.min_len else ")")
                )
            self._data.append(items)
        self._sampler = RatioSampler(
            [len(d) for d in self._data], [s.ratio for s in self.specs], self.shuffle, self.seed
        )

    def next_batch(self, count: int | None = None) -> list[Prompt]:
        """The next `count` prompts (default `batch_size`), indexed 0..count-1."""
        picks = self._sampler.take(self.batch_size if count is None else count)
        return [
            Prompt(k, *self._copy(self._data[i][j]), self.specs[i].name)
            for k, (i, j) in enumerate(picks)
        ]

    @staticmethod
    def _copy(item):
        text, ids = item
        return text, list(ids)

    def state_dict(self) -> dict:
        return self._sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._sampler.load_state_dict(state)


def rank_by_length(prompts: list[Prompt]) -> list[Prompt]:
    """The step's prompts sorted by token count, shortest first, ties in drawn order, and
    re-indexed 0..k-1 (ChatLearn's batch-generation ranking): prompts of similar length are
    batched together, so less of each generation batch is padding. The set of prompts is
    unchanged."""
    ranked = sorted(prompts, key=lambda p: len(p.ids))  # sorted() is stable
    return [Prompt(k, p.text, p.ids, p.dataset) for k, p in enumerate(ranked)]


# ----------------------------------------------------------------------------- relay buffer


@dataclass
class EpisodeRelayBuffer:
    """One past episode (PPO step) as `relay_sample_fn` sees it (ChatLearn's attributes).

    `buffer` holds the samples *generated* in that episode, one dict each:
    episode_id, sample_id, prompt_index (within that step), prompt_ids, response_ids (token id
    lists), prompt_text, response_text, finish_reason, version (policy version that generated
    it) and score (its raw reward, before clipping and normalisation). Samples replayed into
    the episode are not in it, so replays never compound.
    """

    episode_id: int
    buffer: list[dict]


class RelayBuffer:
    """The episodes a relay_sample_fn may draw from.

    max_episodes: -1 keeps every episode, 0 turns the relay off, k keeps the newest k.
    offset: episodes (steps, counted from 0) before `offset` are never kept.
    """

    def __init__(self, max_episodes: int = 0, offset: int = 0):
        self.max_episodes, self.offset = max_episodes, offset
        self.episodes: list[EpisodeRelayBuffer] = []

    @property
    def enabled(self) -> bool:
        return self.max_episodes != 0

    def add(self, episode_id: int, samples: list[dict]) -> None:
        if not self.enabled or episode_id < self.offset:
            return
        self.episodes.append(EpisodeRelayBuffer(episode_id, samples))
        if self.max_episodes > 0:
            del self.episodes[: -self.max_episodes]  # evict the oldest

    def state_dict(self) -> dict:
        return {"episodes": [(e.episode_id, e.buffer) for e in self.episodes]}

    def load_state_dict(self, state: dict) -> None:
        self.episodes = [EpisodeRelayBuffer(i, list(b)) for i, b in state["episodes"]]
